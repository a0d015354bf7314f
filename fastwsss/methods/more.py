"""MoRe, "Class Patch Attention Needs Regularization for Weakly Supervised Semantic Segmentation" (AAAI 2025), as its
official code computes it (docs/methods/more.md). ToCo's network and terms (classification, the token affinity term
PTC on the aux CAM's token labels, the PAR-refined segmentation and regularisation terms) on a ViT whose sequence
starts with P = R + K learnable prefix tokens: R "regulariser" tokens whose outputs are dropped, then one class token
per foreground class. A graph module (GCR) refines the class tokens from their top-k neighbours among the class and
patch tokens; three token terms tie them to the CAMs: a class-token separation loss (``mct``), CLE (each present
class token against the patch features of its confident tokens) and UNE (uncertain patch tokens next to confident
foreground pulled towards the present class tokens, away from the absent ones). The localisation map (LAM) is the
dot product of the refined class tokens with the final patch features.

Every attention runs fused (SDPA, the blocks' ``MaskedKeyAttention`` without a mask): no loss, label or reported
number reads an attention entry (docs/methods/more.md §11), so nothing is materialised."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import Config, check_range
from ..data.transforms import maybe_flip, normalize, photometric, random_pad_crop, random_rescale, random_resized_crop
from ..kernels import swap_attention
from ..models import WSSSNet, create_vit, load_pretrained
from ..models.network import max_pool_logits, tokens_to_map
from ..pseudo import affinity_label, minmax_normalize, multiscale_cams
from ..runtime import fp32_arithmetic
from .base import Iteration, Method, Term
from .common import affinity_term, classification_terms, label_counts, reg_term
from .losses import seg_loss_halves

POS_INTERPOLATIONS = ("scale_factor", "size")
CROPS = ("resized", "rescale_pad")


@dataclass
class MoReConfig:
    """``more:``, MoRe's own settings. Shared with the lineage: the PTC term is ``loss.w_aff`` / ``aff_start``, the
    segmentation and regularisation terms ``loss.w_seg`` / ``seg_start`` and ``loss.w_reg`` / ``reg_start``; the
    CAM scales and the main thresholds are ``cam.*`` (they label the segmentation, PTC and UNE's early phase)."""

    num_registers: int = 4  # prefix tokens before the class tokens; attended in every block, outputs dropped (Q23)
    gcr: bool = True  # the graph module refines the class tokens for every consumer (the official forward default)
    gcr_topk_ratio: float = 0.5  # each class token aggregates int(ratio * K) neighbours, class tokens included (Q6)
    gcr_lr_mult: float = 10.0  # the graph module's learning rate, x optim.lr
    w_mct: float = 1.0  # the class-token separation term, on at every step
    mct_temperature: float = 0.07
    w_cle: float = 0.2
    cle_start: int = 0  # first iteration with CLE (the COCO script: weight 0 while n_iter <= 12000 -> 12001)
    cle_temperature: float = 0.5  # VOC 0.5, COCO 0.1
    cle_high_thresh: float = 0.5  # CLE's early label: the aux CAM at (this, cam.low_thresh)
    w_une: float = 0.1
    une_start: int = 0
    une_tokens: int = 8  # uncertain tokens per image (crop_num)
    une_kernel: int = 6  # the window around a candidate, and twice the margin of the candidates' grid
    une_min_mean: float = 1.2  # a candidate is kept if its window's mean roi (0 bg, 1 uncertain, 2 fg) is >= this
    token_label_aux_until: int | None = 10000  # CLE / UNE labels from the aux CAM while step <= this, then from the
    #   main CAM (VOC: the literal n_iter <= 10000; COCO: n_iter <= cam2mask = 50000); null: the main CAM throughout
    late_high_thresh: float = 0.6  # the late label: the main CAM at (0.6, 0.35)
    late_low_thresh: float = 0.35
    crop: str = "resized"  # resized: RandomResizedCrop, area scale data.rescale_range, bicubic (VOC) | rescale_pad:
    #   colour jitter, rescale by data.rescale_range, flip, black pad + crop (COCO)
    lam_scales: tuple[float, ...] = (1.0,)  # the LAM's scales in evaluation (mode "lam"; 1.0 is always the first)
    # the official code's quirks, reproduced by default (docs/methods/more.md §9)
    gcr_sum_product: bool = True  # Q1: the knowledge-attention logit is (sum n)(sum g); false: the dot product <n, g>
    une_displaced: bool = True  # Q4: UNE reads the token 3 rows / columns up-left of its candidate; false: the candidate
    register_pos_std: float = 1.0  # Q3: the register tokens' position embeddings ~ trunc-normal(0, this) on [-2, 2]
    pos_interpolation: str = "scale_factor"  # Q18: bicubic by scale factor (h + 0.1) / 14, the table as is at a square
    #   input of its own grid | size: bicubic to the grid (ToCo's resampling)
    keep_box: bool = False  # Q9: the padded crop's box is dropped (the whole crop is supervised); true: keep it

    def errors(self, cfg: Config) -> list[str]:
        errors = []
        for key in ("cle_high_thresh", "late_high_thresh", "late_low_thresh"):
            check_range(errors, f"more.{key}", getattr(self, key), 0.0, 1.0)
        for key in ("w_mct", "w_cle", "w_une", "gcr_lr_mult", "register_pos_std"):
            check_range(errors, f"more.{key}", getattr(self, key), 0.0)
        for key in ("mct_temperature", "cle_temperature", "une_min_mean"):
            check_range(errors, f"more.{key}", getattr(self, key), 0.0, lo_open=True)
        check_range(errors, "more.gcr_topk_ratio", self.gcr_topk_ratio, 0.0, 1.0, lo_open=True)
        K = cfg.data.num_classes - 1
        if K >= 1 and int(self.gcr_topk_ratio * K) < 1:
            errors.append(f"more.gcr_topk_ratio={self.gcr_topk_ratio} leaves no neighbour for {K} class tokens "
                          "(int(ratio * K) must be >= 1)")
        for key in ("num_registers",):
            check_range(errors, f"more.{key}", getattr(self, key), 0)
        for key in ("une_tokens", "une_kernel"):
            check_range(errors, f"more.{key}", getattr(self, key), 1)
        if self.late_low_thresh > self.late_high_thresh:
            errors.append(f"more.late_low_thresh={self.late_low_thresh} must be <= more.late_high_thresh="
                          f"{self.late_high_thresh}")
        if cfg.cam.low_thresh > self.cle_high_thresh:
            errors.append(f"cam.low_thresh={cfg.cam.low_thresh} must be <= more.cle_high_thresh={self.cle_high_thresh}")
        if not self.lam_scales or min(self.lam_scales) <= 0:
            errors.append(f"more.lam_scales={list(self.lam_scales)} must be one or more positive scales")
        for key, value, choices in (("crop", self.crop, CROPS), ("pos_interpolation", self.pos_interpolation,
                                                                  POS_INTERPOLATIONS)):
            if value not in choices:
                errors.append(f"more.{key}={value!r} is not one of {', '.join(choices)}")
        return errors


# ---- the backbone: a timm ViT with P = R + K prefix tokens


@torch.no_grad()
def expand_prefix(vit: nn.Module, num_prefix: int, num_registers: int, register_pos_std: float = 1.0) -> nn.Module:
    """Turn a one-class-token timm ViT (pretrained or not) into MoRe's, in place, as the official ``reload`` does with
    the downloaded weights: ``cls_token`` [1, P, D] = its class token repeated P times; ``pos_embed`` [1, P + G*G, D]
    = its class entry repeated P times, the first ``num_registers`` entries then replaced by trunc-normal(0,
    ``register_pos_std``) draws on [-2, 2] (the official std 1, Q3), then the patch table as it is. Both stay timm's
    parameters (names kept; the position embedding keeps its requires_grad). Returns ``vit``."""
    if getattr(vit, "num_prefix_tokens", 1) != 1:
        raise ValueError(f"expand_prefix needs a ViT with one class token, it has {vit.num_prefix_tokens}")
    cls, pe = vit.cls_token.detach(), vit.pos_embed.detach()
    prefix = pe[:, :1].repeat(1, num_prefix, 1)
    if num_registers:
        noise = torch.zeros(1, num_registers, pe.shape[-1])
        prefix[:, :num_registers] = nn.init.trunc_normal_(noise, std=register_pos_std, a=-2.0, b=2.0).to(pe)
    trainable = vit.pos_embed.requires_grad
    vit.cls_token = nn.Parameter(cls.repeat(1, num_prefix, 1))
    vit.pos_embed = nn.Parameter(torch.cat([prefix, pe[:, 1:]], dim=1), requires_grad=trainable)
    vit.num_prefix_tokens = num_prefix
    return vit


def prefix_pos_embed(pos_embed: torch.Tensor, num_prefix: int, image_size: tuple[int, int], grid: tuple[int, int],
                     mode: str = "scale_factor") -> torch.Tensor:
    """The [1, P + G*G, D] table -> [1, P + h*w, D] for an input of ``image_size`` pixels and patch ``grid`` (h, w).
    The prefix entries as they are; the patch part: ``scale_factor`` (the official, DINO's): the table itself when the
    input is square and has G*G patches, else bicubic (align_corners False) by the scale factors ((h + 0.1) / G,
    (w + 0.1) / G), whose coordinate mapping is not the size-based one (Q18); ``size``: bicubic to (h, w)."""
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    G = math.isqrt(patch.shape[1])
    if G * G != patch.shape[1]:
        raise ValueError(f"position-embedding table of {patch.shape[1]} patches is not square")
    h, w = grid
    if mode == "scale_factor" and h * w == G * G and image_size[0] == image_size[1]:
        return pos_embed
    table = patch.reshape(1, G, G, -1).permute(0, 3, 1, 2)
    if mode == "scale_factor":
        table = F.interpolate(table, scale_factor=((h + 0.1) / G, (w + 0.1) / G), mode="bicubic", align_corners=False)
    else:
        table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
    if table.shape[-2:] != (h, w):
        raise ValueError(f"position embedding resampled to {tuple(table.shape[-2:])}, the grid is {(h, w)}")
    return torch.cat([prefix, table.flatten(2).transpose(1, 2)], dim=1)


class GraphClassRefiner(nn.Module):
    """GCR (docs/methods/more.md §2): class tokens [B, K, D] and (detached) patch tokens [B, N, D] -> refined class
    tokens [B, K, D]. Head embeddings of the class tokens, tail embeddings of all K + N tokens; each class token keeps
    its int(ratio * K) strongest neighbours (scaled dot product; itself and the other class tokens are candidates),
    mixes them with itself by their softmax, gates them (tanh), weighs them by a knowledge attention, and aggregates
    bi-interactively: LayerNorm(LeakyReLU(W1(0.1 (e_h + e_N) + c)) + LeakyReLU(W2(0.1 e_h * e_N + c))).
    ``sum_product`` (Q1): the knowledge-attention logit is the product of the two vectors' coordinate sums, as the
    official einsum computes it; false: their dot product. Parameter names as the official module's."""

    def __init__(self, dim: int, topk_ratio: float = 0.5, sum_product: bool = True):
        super().__init__()
        self.head_proj = nn.Linear(dim, dim)
        self.tail_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.scale = dim ** -0.5
        self.topk_ratio, self.sum_product = topk_ratio, sum_product

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        B, K, D = tokens.shape
        k = int(self.topk_ratio * K)
        e_h = self.head_proj(tokens)  # [B, K, D]
        e_t = self.tail_proj(torch.cat([tokens, patches.detach()], dim=1))  # [B, K + N, D]
        weight, index = ((e_h * self.scale) @ e_t.transpose(-2, -1)).topk(k, dim=-1)  # [B, K, k]
        nb = e_t.gather(1, index.reshape(B, K * k, 1).expand(-1, -1, D)).reshape(B, K, k, D)
        p = weight.softmax(dim=-1)[..., None]
        gate = torch.tanh(e_h[:, :, None] + ((1 - p) * e_h[:, :, None] + p * nb))
        omega = nb.sum(-1) * gate.sum(-1) if self.sum_product else (nb * gate).sum(-1)  # [B, K, k]
        agg = (omega.softmax(dim=-1)[:, :, None] @ nb)[:, :, 0]  # [B, K, D]
        u = F.leaky_relu(self.linear1((e_h + agg) * 0.1 + tokens))
        v = F.leaky_relu(self.linear2(e_h * agg * 0.1 + tokens))
        return self.norm(u + v)


class MoReOutputs(NamedTuple):
    """``models.Outputs`` plus the class tokens."""

    cls_logits: torch.Tensor  # [B, C-1]
    aux_logits: torch.Tensor  # [B, C-1]
    seg_logits: torch.Tensor | None  # [B, C, h, w]
    feat: torch.Tensor  # [B, D, h, w] final patch tokens (after the final norm)
    aux_feat: torch.Tensor  # [B, D, h, w] block-`aux_layer` patch tokens, before norm
    cls_token: torch.Tensor  # [B, D] the sequence's first token (the first register) after the final norm
    class_tokens: torch.Tensor  # [B, K, D] the class tokens after the final norm, before GCR


class MoReNet(WSSSNet):
    """The WSSS network on MoRe's ViT: ``backbone`` is a timm ViT (parameter names kept, attention fused) whose one
    class token :func:`expand_prefix` turns into R + K prefix tokens; ``graph_layer`` is the GCR. The CAMs, the
    classifiers and the decoder are ToCo's, on the patch tokens; the class tokens feed the token terms and the LAM."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, num_registers: int = 4,
                 pos_interpolation: str = "scale_factor", register_pos_std: float = 1.0, gcr: bool = True,
                 gcr_topk_ratio: float = 0.5, gcr_sum_product: bool = True, lam_scales: tuple[float, ...] = (1.0,),
                 aux_layer: int = -3, decoder_channels: int = 512, decoder_dilation: int = 5):
        super().__init__(backbone, num_classes, aux_layer=aux_layer, decoder_channels=decoder_channels,
                         decoder_dilation=decoder_dilation)
        self.num_registers, self.num_prefix = num_registers, num_registers + num_classes - 1
        expand_prefix(backbone, self.num_prefix, num_registers, register_pos_std)
        self.pos_interpolation, self.gcr, self.lam_scales = pos_interpolation, gcr, tuple(lam_scales)
        self.graph_layer = GraphClassRefiner(backbone.embed_dim, gcr_topk_ratio, gcr_sum_product)

    def features(self, x: torch.Tensor):
        """[B, 3, H, W] -> first token [B, D], class tokens [B, K, D], patch tokens [B, N, D] (all after the final
        norm), block-``aux_layer`` patch tokens [B, N, D] (before any norm), grid (h, w)."""
        vit, P = self.backbone, self.num_prefix
        t = vit.patch_embed.proj(x)  # [B, D, h, w]; the strided conv drops remainder pixels
        grid = (t.shape[-2], t.shape[-1])
        t = vit.patch_embed.norm(t.flatten(2).transpose(1, 2))
        t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + prefix_pos_embed(vit.pos_embed, P, x.shape[-2:], grid, self.pos_interpolation)
        t = vit.norm_pre(vit.patch_drop(vit.pos_drop(t)))
        aux_index = self.aux_layer % len(vit.blocks)
        aux = None
        for i, blk in enumerate(vit.blocks):  # every prefix token is a query and a key of every block
            t = blk(t)
            if i == aux_index:
                aux = t[:, P:]
        t = vit.norm(t)
        return t[:, 0], t[:, self.num_registers:P], t[:, P:], aux, grid

    def forward(self, x: torch.Tensor, with_seg: bool = True) -> MoReOutputs:
        first, class_tokens, patches, aux, grid = self.features(x)
        feat, aux_feat = tokens_to_map(patches, grid), tokens_to_map(aux, grid)
        return MoReOutputs(cls_logits=max_pool_logits(feat, self.classifier),
                           aux_logits=max_pool_logits(aux_feat, self.aux_classifier),
                           seg_logits=self.decoder(feat) if with_seg else None, feat=feat, aux_feat=aux_feat,
                           cls_token=first, class_tokens=class_tokens)

    def refine(self, out: MoReOutputs) -> torch.Tensor:
        """The class tokens every MoRe consumer reads [B, K, D]: GCR of the class tokens and the patch tokens, or the
        class tokens as they are without it. GCR runs in fp32 under autocast too (its top-k picks neighbours among
        near-equal logits; it costs a [B, K, K + N] product)."""
        if not self.gcr:
            return out.class_tokens
        with fp32_arithmetic():
            return self.graph_layer(out.class_tokens.float(), out.feat.flatten(2).transpose(1, 2).float())

    def lam_from(self, out: MoReOutputs) -> torch.Tensor:
        """The localisation map [B, K, h, w] (fp32, detached): <refined class token k, patch feature> (Q2: a token
        dot product, not an attention map)."""
        tokens = self.refine(out).detach()
        with fp32_arithmetic():
            return torch.einsum("bdhw,bkd->bkhw", out.feat.detach().float(), tokens.float())

    @torch.no_grad()
    def lams(self, x: torch.Tensor, scales: tuple[float, ...] | None = None) -> torch.Tensor:
        """The multi-scale LAM [B, K, H, W] in [0, 1] (:func:`multiscale_lams`) at ``scales`` (default the
        network's ``lam_scales``)."""
        return multiscale_lams(self, x, self.lam_scales if scales is None else scales)


@torch.no_grad()
def multiscale_lams(model: MoReNet, x: torch.Tensor, scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """The official ``multi_scale_lam2``: scale 1.0 first, then every other scale; each scale's images batched with
    their flips, LAM (:meth:`MoReNet.lam_from`) upsampled bilinearly to (H, W), the flip pair fused by max, no ReLU;
    summed over the scales and min-max normalised per image and class (the signed minimum subtracted)."""
    B, _, H, W = x.shape
    total = 0
    for s in (1.0, *(s for s in scales if s != 1.0)):
        xs = x if s == 1.0 else F.interpolate(x, size=(int(s * H), int(s * W)), mode="bilinear", align_corners=False)
        lam = model.lam_from(model(torch.cat([xs, xs.flip(-1)]), with_seg=False))
        with fp32_arithmetic():
            lam = F.interpolate(lam, size=(H, W), mode="bilinear", align_corners=False)
            total = total + torch.maximum(lam[:B], lam[B:].flip(-1))
    return minmax_normalize(total)


# ---- the token terms


@fp32_arithmetic()
def mct_loss(tokens: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """The class-token separation term (``multi_cls_loss``), summed over the images: with t the L2-normalised
    tokens [b, K, D] and Z = t t^T / temperature, the mean over k of -log softmax(Z[:, k])[k] (the official softmax
    runs over dim 1, a column: the same values, Z is symmetric, Q20)."""
    t = F.normalize(tokens.float(), dim=-1)
    z = t @ t.transpose(1, 2) / temperature
    return -z.log_softmax(dim=1).diagonal(dim1=1, dim2=2).mean(-1).sum()


@fp32_arithmetic()
def cle_loss(tokens: torch.Tensor, feat: torch.Tensor, label: torch.Tensor, cls_label: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """CLE (``CRELoss_neg``), summed over the images, in log space. tokens [b, K, D] (with gradient), feat
    [b, D, h, w] (detached, not normalised: Q11), token label [b, N] (k + 1 = class k, 0 background, 255 uncertain).
    With z = <t_k, F_i> / temperature (t L2-normalised, eps 1e-8) and lambda_i = -log(e^z_i / (sum_j e^z_j + 1e-4)):
    sum over present classes k of (sum of lambda over the tokens labelled k) / (their count + 1e-4). Where the
    official sum of exponentials underflows to 0, its -log(1 / (1 + 1e-4)) is kept; where its exp overflows (a NaN
    there), the log-space value is finite."""
    t = F.normalize(tokens.float(), dim=-1, eps=1e-8)
    z = t @ feat.detach().float().flatten(2) / temperature  # [b, K, N]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    lam = torch.logaddexp(lse, torch.full_like(lse, math.log(1e-4))) - z
    underflow = torch.exp(z.amax(dim=-1, keepdim=True)) == 0
    lam = torch.where(underflow, torch.full_like(lam, math.log1p(1e-4)), lam)
    K = tokens.shape[1]
    member = (label[:, None, :] == torch.arange(1, K + 1, device=label.device)[None, :, None]).float()  # [b, K, N]
    per_class = (lam * member).sum(-1) / (member.sum(-1) + 1e-4)
    return (per_class * cls_label.float()).sum()


def une_roi(label: torch.Tensor) -> torch.Tensor:
    """Token labels -> roi: 0 background, 1 uncertain (255), 2 foreground."""
    return torch.where(label == 255, 1, torch.where(label > 0, 2, 0))


def une_search(roi: torch.Tensor, keys: torch.Tensor, num_tokens: int = 8, kernel: int = 6, min_mean: float = 1.2,
               displaced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``uncertain_kernel_search``, vectorised (no host sync). roi [b, h, w]; keys [b, L] uniform random
    draws, one per position of the inner grid roi[m:h-m, m:w-m] (m = kernel // 2, L = (h - 2m)(w - 2m), row-major).

    A candidate is an uncertain position (r, c) of the inner grid whose window roi[r:r+kernel, c:c+kernel] (relative
    indices used as absolute ones) has a mean >= ``min_mean``. More than ``num_tokens`` candidates: the
    ``num_tokens`` of largest key (a uniformly random subset, as the official ``randperm(n)[:num_tokens]``);
    otherwise all of them plus (num_tokens - n) // 4 positions of largest key among the inner foreground positions,
    or among all inner positions when there are fewer foreground ones. The token read is at (r, c) of the whole grid
    (``displaced``, Q4: 3 up and 3 left of the candidate), else at the candidate (r + m, c + m).

    Returns flat token indices [b, S] into the h*w grid and their validity [b, S] (S = num_tokens + num_tokens // 4;
    invalid slots point at token 0)."""
    b, h, w = roi.shape
    m = kernel // 2
    ih, iw = h - 2 * m, w - 2 * m
    L = max(ih, 0) * max(iw, 0)
    if keys.shape != (b, L):
        raise ValueError(f"une_search: keys are {tuple(keys.shape)}, the {h}x{w} grid has {L} inner positions")
    S = num_tokens + num_tokens // 4
    if L == 0:
        return roi.new_zeros(b, S, dtype=torch.long), torch.zeros(b, S, dtype=torch.bool, device=roi.device)
    inner = roi[:, m:h - m, m:w - m].reshape(b, L)
    sums = F.avg_pool2d(roi[:, None].float(), kernel, stride=1, divisor_override=1)[:, 0, :ih, :iw].reshape(b, L)
    accepted = (inner == 1) & (sums / (kernel * kernel) >= min_mean)
    n = accepted.sum(1, keepdim=True)
    extra = ((num_tokens - n) // 4).clamp_min(0)  # [b, 1]: 0 when more than num_tokens are accepted
    fg = inner == 2
    pool = torch.where(fg.sum(1, keepdim=True) >= extra, fg, torch.ones_like(fg))
    first = keys.masked_fill(~accepted, -1.0).topk(min(num_tokens, L), dim=1)
    second = keys.masked_fill(~pool, -1.0).topk(min(num_tokens // 4, L), dim=1)
    index = torch.cat([first.indices, second.indices], dim=1)
    slots = torch.arange(second.values.shape[1], device=roi.device)
    valid = torch.cat([first.values >= 0, (second.values >= 0) & (slots < extra)], dim=1)
    r, c = index // iw, index % iw
    if not displaced:
        r, c = r + m, c + m
    index = torch.where(valid, r * w + c, 0)
    pad = S - index.shape[1]
    return F.pad(index, (0, pad)), F.pad(valid, (0, pad))


@fp32_arithmetic()
def une_loss(tokens: torch.Tensor, feat: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
             cls_label: torch.Tensor) -> torch.Tensor:
    """UNE (``URELoss_neg``), summed over the selected tokens. feat [b, D, h, w] (with gradient), the selected
    tokens ``index`` / ``valid`` [b, S] (:func:`une_search`), tokens [b, K, D] (detached). With u the L2-normalised
    patch feature and s_k = |<u, t_k>| (t normalised, eps 1e-8): 0.5 (1 - sum_present s / (#present + 1))
    + 0.5 sum_absent s / (#absent + 1) per selected token."""
    D = feat.shape[1]
    u = feat.float().flatten(2).transpose(1, 2).gather(1, index[..., None].expand(-1, -1, D))  # [b, S, D]
    u = F.normalize(u, dim=-1, eps=1e-8)
    t = F.normalize(tokens.detach().float(), dim=-1, eps=1e-8)
    s = (u @ t.transpose(1, 2)).abs()  # [b, S, K]
    y = cls_label.float()[:, None, :]
    per_token = (0.5 * (1 - (y * s).sum(-1) / (y.sum(-1) + 1))
                 + 0.5 * ((1 - y) * s).sum(-1) / ((1 - y).sum(-1) + 1))
    return (per_token * valid).sum()


# ---- the loader


@dataclass(frozen=True)
class MoReViews:
    """MoRe's training crop (docs/methods/more.md §6.2), ``img`` and ``img_box``, plus ``une_keys``: the sample's UNE
    draws, one uniform key per inner grid position (:func:`une_search`), drawn here so that every random choice of
    a step is a function of the sample's position (no host sync, the same for any number of processes).

    - ``resized`` (VOC): RandomResizedCrop(crop_size, area scale ``scale_range``, ratio (3/4, 4/3), bicubic,
      torchvision's fallback) -> flip p 0.5 -> colour jitter (0.4, 0.4, 0.2, 0.1) p ``jitter_p``; nothing is padded.
    - ``rescale_pad`` (COCO): colour jitter p ``jitter_p`` on the image -> rescale U(``scale_range``) (bilinear) ->
      flip p 0.5 -> black pad + random crop; its box is dropped (the whole crop, Q9) unless ``keep_box``."""

    crop_size: int
    scale_range: tuple[float, float]
    jitter_p: float = 0.5
    crop: str = "resized"
    keep_box: bool = False
    num_keys: int = 0

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        S = self.crop_size
        box = [0, S, 0, S]
        if self.crop == "resized":
            img = random_resized_crop(image, rng, S, self.scale_range, torchvision_fallback=True)
            img = photometric(maybe_flip(img, bool(rng.random() < 0.5)), rng, self.jitter_p, 0.0, 0.0)
            crop = np.asarray(img)
        else:
            img = random_rescale(photometric(image, rng, self.jitter_p, 0.0, 0.0), rng, self.scale_range)
            crop, padded = random_pad_crop(np.asarray(maybe_flip(img, bool(rng.random() < 0.5))), rng, S)
            box = padded if self.keep_box else box
        return {"img": torch.from_numpy(normalize(crop)), "img_box": torch.tensor(box, dtype=torch.long),
                "une_keys": torch.from_numpy(rng.random(self.num_keys))}


# ---- the method


@dataclass
class MoReTargets:
    """What one part of a step's batch is scored against, while the terms that read it are on."""

    seg_label: torch.Tensor | None = None  # [b, H, W] PAR-refined, from the main CAM
    aff_label: torch.Tensor | None = None  # [b, N] the aux CAM at cam.high / low_thresh
    cle_label: torch.Tensor | None = None  # [b, N]
    une_index: torch.Tensor | None = None  # [b, S] UNE's tokens
    une_valid: torch.Tensor | None = None


class MoRe(Method):
    name = "more"
    config = MoReConfig
    log_names: ClassVar[dict[str, str]] = {"cls": "cls_loss", "cls_aux": "cls_loss_aux", "mct": "cls_loss_mct",
                                           "aff": "ptc_loss", "cle": "cle_loss", "une": "une_loss",
                                           "seg": "seg_loss", "reg": "reg_loss"}  # reg_loss: not in the official log
    eval_modes = ("cam", "aux-cam", "lam", "seg", "pseudo")

    def une_grid(self, model: MoReNet) -> tuple[int, int]:
        """The token grid (h, w) of a training crop."""
        p = model.backbone.patch_embed.patch_size
        return self.cfg.data.crop_size // p[0], self.cfg.data.crop_size // p[1]

    def sample_views(self, model: MoReNet) -> MoReViews:
        d, c = self.cfg.data, self.cfg.more
        h, w = self.une_grid(model)
        m = c.une_kernel // 2
        inner = max(h - 2 * m, 0) * max(w - 2 * m, 0)
        if inner == 0 and c.w_une and c.une_start < self.cfg.train.max_iters:
            raise ValueError(f"more.w_une={c.w_une}: UNE needs a token grid larger than more.une_kernel="
                             f"{c.une_kernel}, the training crop's is {h}x{w} (data.crop_size={d.crop_size})")
        return MoReViews(d.crop_size, tuple(d.rescale_range), d.color_jitter_p, c.crop, c.keep_box, inner)

    def build_model(self) -> MoReNet:
        """The ``model.*`` timm ViT (pretrained weights loaded into its one class token as timm names them, so a timm
        file or timm's hub loads; the official https-branch transform then applied: :func:`expand_prefix`), its
        attention swapped for the kernels' fused drop-in, the heads, and the GCR."""
        m, c = self.cfg.model, self.cfg.more
        vit = create_vit(m.backbone, img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                         depth=m.depth, num_heads=m.num_heads, pretrained_timm=m.pretrained == "timm",
                         freeze_pos_embed=m.freeze_pos_embed)
        if m.pretrained not in ("", "none", "timm"):
            load_pretrained(vit, m.pretrained, strict=m.pretrained_strict)
        swap_attention(vit, self.cfg.kernels.backend)
        return MoReNet(vit, self.cfg.data.num_classes, num_registers=c.num_registers,
                       pos_interpolation=c.pos_interpolation, register_pos_std=c.register_pos_std, gcr=c.gcr,
                       gcr_topk_ratio=c.gcr_topk_ratio, gcr_sum_product=c.gcr_sum_product,
                       lam_scales=tuple(c.lam_scales), aux_layer=m.aux_layer, decoder_channels=m.decoder_channels,
                       decoder_dilation=m.decoder_dilation)

    def param_groups(self, model: MoReNet) -> list[dict]:
        """The backbone at ``optim.lr`` (its class tokens and position embedding included), the classifiers and the
        decoder at ``optim.lr * optim.head_lr_mult``, the GCR at ``optim.lr * more.gcr_lr_mult``; weight decay on
        every group, as the official optimiser."""
        o = self.cfg.optim
        graph = {id(p) for p in model.graph_layer.parameters()}
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        heads = [p for m in model.head_modules() for p in m.parameters() if p.requires_grad and id(p) not in graph]
        return [{"params": backbone, "initial_lr": o.lr}, {"params": heads, "initial_lr": o.lr * o.head_lr_mult},
                {"params": list(model.graph_layer.parameters()), "initial_lr": o.lr * self.cfg.more.gcr_lr_mult}]

    def weights(self, step: int) -> dict[str, float]:
        loss, c = self.cfg.loss, self.cfg.more
        return {"aff": loss.w_aff if step >= loss.aff_start else 0.0,
                "cle": c.w_cle if step >= c.cle_start else 0.0,
                "une": c.w_une if step >= c.une_start else 0.0,
                "seg": loss.w_seg if step >= loss.seg_start else 0.0,
                "reg": loss.w_reg if step >= loss.reg_start else 0.0}

    def token_labels_from_aux(self, step: int) -> bool:
        """Whether CLE's and UNE's token labels come from the aux CAM at ``step`` (step <= more.token_label_aux_until)
        or from the main CAM."""
        until = self.cfg.more.token_label_aux_until
        return until is not None and step <= until

    def forward(self, model: MoReNet, batch: dict, it: Iteration) -> MoReOutputs:
        return model(batch["img"], with_seg=bool(it.weights["seg"] or it.weights["reg"]))

    @torch.no_grad()
    def targets(self, model: MoReNet, batch: dict, it: Iteration, out: MoReOutputs | None = None) -> MoReTargets:
        """The multi-scale CAMs (``out`` reused as the unflipped scale-1 pass: exact, no dropout anywhere) and what
        the weighted terms read: the PAR-refined segmentation label (main CAM), the token labels on the patch grid
        (the aux CAM at cam.high / low_thresh for PTC and UNE's early phase, at more.cle_high_thresh / cam.low_thresh
        for CLE's early phase; the main CAM at more.late_* for both late phases), UNE's tokens."""
        t, w, cfg, c = MoReTargets(), it.weights, self.cfg, self.cfg.more
        if not any(w.values()):
            return t
        x, cls_label, img_box = batch["img"], batch["cls_label"], batch["img_box"]
        if out is None:
            out = model(x, with_seg=False)
        cams, cams_aux = multiscale_cams(model, x, tuple(cfg.cam.scales), outputs=out)
        if w["seg"] or w["reg"]:
            t.seg_label = self.pseudo_labeller()(cams, cls_label, x, img_box)
        grid = out.feat.shape[-2:]

        def token_label(source, high, low):
            return affinity_label(source, cls_label, img_box, grid, high_thresh=high, low_thresh=low,
                                  scale_box_to_grid=True)

        early = self.token_labels_from_aux(it.step)
        late = token_label(cams, c.late_high_thresh, c.late_low_thresh) if not early and (w["cle"] or w["une"]) else None
        aux = token_label(cams_aux, cfg.cam.high_thresh, cfg.cam.low_thresh) if w["aff"] or (early and w["une"]) else None
        t.aff_label = aux if w["aff"] else None
        if w["cle"]:
            t.cle_label = token_label(cams_aux, c.cle_high_thresh, cfg.cam.low_thresh) if early else late
        if w["une"]:
            label = aux if early else late
            roi = une_roi(label).reshape(len(label), *grid)
            t.une_index, t.une_valid = une_search(roi, batch["une_keys"], c.une_tokens, c.une_kernel, c.une_min_mean,
                                                  c.une_displaced)
        return t

    def counts(self, targets: MoReTargets, batch: dict) -> dict[str, torch.Tensor]:
        """Images, segmentation-label foreground / background pixels, positive / negative token pairs, UNE's tokens."""
        counts = super().counts(targets, batch)
        une = targets.une_valid.sum().double() if targets.une_valid is not None else counts["images"].new_zeros(())
        return {**counts, **label_counts(targets.seg_label, targets.aff_label, self.cfg.data.num_classes,
                                         counts["images"]), "une_tokens": une}

    def terms(self, model: MoReNet, batch: dict, it: Iteration, targets: MoReTargets, norm: dict[str, torch.Tensor],
              parts: int, out: MoReOutputs) -> dict[str, Term]:
        cfg, c, w, x, y = self.cfg, self.cfg.more, it.weights, batch["img"], batch["cls_label"]
        terms = classification_terms(model, out, y, norm["images"], cfg.loss.w_cls_aux)
        if c.w_mct or w["cle"] or w["une"]:
            tokens = model.refine(out)
        if c.w_mct:
            terms["mct"] = Term(mct_loss(tokens, c.mct_temperature) / norm["images"], c.w_mct)
        if w["aff"]:
            terms["aff"] = affinity_term(out.feat, targets.aff_label, norm, parts, w["aff"], cfg)
        if w["cle"]:
            loss = cle_loss(tokens, out.feat, targets.cle_label, y, c.cle_temperature)
            terms["cle"] = Term(loss / norm["images"], w["cle"])
        if w["une"]:
            loss = une_loss(tokens, out.feat, targets.une_index, targets.une_valid, y)
            terms["une"] = Term(loss / norm["une_tokens"].clamp_min(1), w["une"])
        if w["seg"] or w["reg"]:
            seg = F.interpolate(out.seg_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if w["seg"]:
            fg, bg = seg_loss_halves(seg, targets.seg_label, torch.stack([norm["fg"], norm["bg"]]), eps=1e-6)
            terms["seg"] = Term(0.5 * (fg + bg), w["seg"])
        if w["reg"]:
            terms["reg"] = reg_term(seg, x, batch["img_box"], targets.seg_label, w["reg"], norm, cfg)
        return terms


__all__ = ["GraphClassRefiner", "MoRe", "MoReConfig", "MoReNet", "MoReOutputs", "MoReTargets", "MoReViews",
           "cle_loss", "expand_prefix", "mct_loss", "multiscale_lams", "prefix_pos_embed", "une_loss", "une_roi",
           "une_search"]
