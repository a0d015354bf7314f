"""A plain reading of MoRe's official training step (docs/methods/more.md §1-§6), written the straightforward way: the
backbone's explicit attention (the softmax and the raw-logits copy materialised in every block), the DINO position
interpolation, the per-image and per-token loops with host-side decisions of the official losses and labels, fp32,
one piece after the other as the official ``train_voc.py`` calls them. It is the oracle of ``tests/test_more.py`` and
the baseline ``benchmarks/method_step.py`` times fastwsss's step against; it reuses nothing of
``fastwsss.methods.more``.

The network's weights are fastwsss's ``MoReNet`` (timm's parameter names: the same ViT, heads, decoder and GCR as the
official ``network``); PAR is fastwsss's reference (``backend="torch"``), the regularisation term fastwsss's
``reg_loss`` on the reference lattice (both tested against their own references elsewhere).

The random draws of UNE (``torch.randperm`` in the official code) come from ``randperm(image, positions)``: the
permutation of the candidate positions (inner-grid flat indices, in the official row-major order). The default draws
``torch.randperm``; the tests and the step comparison pass :func:`permutation_by_keys`, the order of the same keys
fastwsss draws, so that both select the same tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastwsss.data.transforms import denormalize, denormalize_uint8
from fastwsss.kernels import par_refine
from fastwsss.methods.losses import reg_loss

# ---- the backbone (model/backbone/mat_vit.py, vit.py)


def reload_state_dict(checkpoint: dict, num_attri: int, num_patches: int) -> dict:
    """``reload``'s https branch on a timm state dict (one class token): the patch table bicubic-resized to the
    model's grid, the class entry of the position embedding repeated ``num_attri`` times with the first 4 replaced by
    ``trunc_normal_`` of a zero tensor (defaults: std 1 on [-2, 2], the global RNG), the class token repeated."""
    sd = dict(checkpoint)
    pos = sd["pos_embed"]
    D = pos.shape[-1]
    orig = int((pos.shape[-2] - 1) ** 0.5)
    new = int(num_patches ** 0.5)
    extra = pos[:, :1].repeat(1, num_attri, 1)
    extra[:, :4] = torch.nn.init.trunc_normal_(torch.zeros(1, 4, D))
    tokens = pos[:, 1:].reshape(-1, orig, orig, D).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new, new), mode="bicubic", align_corners=False)
    sd["pos_embed"] = torch.cat([extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    sd["cls_token"] = sd["cls_token"].repeat(1, num_attri, 1)
    return sd


def interpolate_pos_encoding(pos_embed: torch.Tensor, num_attri: int, x: torch.Tensor, w: int, h: int,
                             patch: int) -> torch.Tensor:
    """``MATformer.interpolate_pos_encoding`` (x: the token sequence; w, h: the input's dims 2 and 3)."""
    npatch = x.shape[1] - num_attri
    N = pos_embed.shape[1] - num_attri
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0:num_attri]
    patch_pos_embed = pos_embed[:, num_attri:]
    dim = x.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed, patch_pos_embed), dim=1)


def attention(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vit.py ``Attention.forward``: explicit softmax over all keys; also the raw q k^T (``weights``)."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    weights = logits / attn.scale
    probs = logits.softmax(dim=-1)
    x = (probs @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(x), weights


def block(blk, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, weights = attention(blk.attn, blk.norm1(x))
    x = x + y
    x = x + blk.mlp(blk.norm2(x))
    return x, weights


def forward_features(vit, x: torch.Tensor, num_attri: int, aux_layer: int = -3):
    """``MATformer.forward_features``: (class tokens 4.., patches after the final norm, block ``aux_layer``'s patches
    before it, the last block's raw logits without the 4 register rows / columns)."""
    B, _, w, h = x.shape
    patch = vit.patch_embed.patch_size[0]
    t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((vit.cls_token.expand(B, -1, -1), t), dim=1)
    t = t + interpolate_pos_encoding(vit.pos_embed, num_attri, t, w, h, patch)
    feats = []
    for blk in vit.blocks:
        t, weights = block(blk, t)
        feats.append(t)
    t = vit.norm(t)
    feats[-1] = t
    return t[:, 4:num_attri], t[:, num_attri:], feats[aux_layer][:, num_attri:], weights[:, :, 4:, 4:]


def gcr(layer, cls_tokens: torch.Tensor, feats: torch.Tensor, tok_ratio: float = 0.5,
        dot: bool = False) -> torch.Tensor:
    """``graphic_cls_aggregation.forward`` (``dot``: the dot-product reading of its einsum, for the switch)."""
    topk = int(tok_ratio * cls_tokens.shape[1])
    x = torch.concat([cls_tokens, feats.clone().detach()], dim=1)
    e_h = layer.head_proj(cls_tokens)
    e_t = layer.tail_proj(x)
    attn_logit = (e_h * layer.scale) @ e_t.transpose(-2, -1)
    weight_topk, index_topk = torch.topk(attn_logit, k=topk, dim=-1)
    index_topk = index_topk.to(torch.long)
    index_expanded = index_topk.expand(e_t.size(0), -1, -1)
    batch_indices = torch.arange(e_t.size(0)).view(-1, 1, 1).to(index_topk.device)
    nb_h = e_t[batch_indices, index_expanded, :]
    topk_prob = F.softmax(weight_topk, dim=2)
    eh_r = torch.matmul((1 - topk_prob).unsqueeze(-1), e_h.unsqueeze(2)) + torch.mul(topk_prob.unsqueeze(-1), nb_h)
    e_h_expand = e_h.unsqueeze(2).expand(-1, -1, topk, -1)
    gate = torch.tanh(e_h_expand + eh_r)
    ka_weight = torch.einsum("ijkl,ijkl->ijk" if dot else "ijkl,ijkm->ijk", nb_h, gate)
    ka_prob = F.softmax(ka_weight, dim=2).unsqueeze(dim=2)
    e_nh = torch.matmul(ka_prob, nb_h).squeeze(dim=2)
    sum_embedding = F.leaky_relu(layer.linear1((e_h + e_nh) * 0.1 + cls_tokens))
    bi_embedding = F.leaky_relu(layer.linear2(e_h * e_nh * 0.1 + cls_tokens))
    return layer.norm(sum_embedding + bi_embedding)


def network(model, x: torch.Tensor, cam_only: bool = False, with_gcr: bool = True):
    """``network.forward`` (model_mal.py): cam_only -> (cam_aux, cam); else (cls, seg, _x4, cls_aux, tokens,
    score_maps)."""
    P = model.num_prefix
    tokens, _x, x_aux, score_maps = forward_features(model.backbone, x, P, model.aux_layer)
    patch = model.backbone.patch_embed.patch_size[0]
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    _x4 = _x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    _x_aux = x_aux.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    if cam_only:
        return F.conv2d(_x_aux, model.aux_classifier.weight).detach(), F.conv2d(_x4, model.classifier.weight).detach()
    cls_aux = model.aux_classifier(F.adaptive_max_pool2d(_x_aux, (1, 1))).view(-1, model.classifier.out_channels)
    cls = model.classifier(F.adaptive_max_pool2d(_x4, (1, 1))).view(-1, model.classifier.out_channels)
    seg = model.decoder(_x4)
    tokens = gcr(model.graph_layer, tokens, _x, dot=not model.graph_layer.sum_product) if with_gcr else tokens
    K = tokens.shape[1]
    score_maps = torch.sum(score_maps, dim=1)[:, :K, K:].reshape(x.shape[0], K, h, w).detach()
    return cls, seg, _x4, cls_aux, tokens, score_maps


# ---- CAMs and labels (utils/camutils.py)


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    cam = cam + F.adaptive_max_pool2d(-cam, (1, 1))
    return cam / (F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5)


def multi_scale_cam2(model, inputs: torch.Tensor, scales) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, h, w = inputs.shape
    cams, cams_aux = [], []
    with torch.no_grad():
        for s in (1.0, *(s for s in scales if s != 1.0)):
            x = inputs if s == 1.0 else F.interpolate(inputs, size=(int(s * h), int(s * w)), mode="bilinear",
                                                      align_corners=False)
            cam_aux, cam = network(model, torch.cat([x, x.flip(-1)]), cam_only=True)
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            cam_aux = F.interpolate(cam_aux, size=(h, w), mode="bilinear", align_corners=False)
            cams.append(F.relu(torch.max(cam[:b], cam[b:].flip(-1))))
            cams_aux.append(F.relu(torch.max(cam_aux[:b], cam_aux[b:].flip(-1))))
        return _minmax(torch.stack(cams).sum(0)), _minmax(torch.stack(cams_aux).sum(0))


def multi_scale_lam2(model, inputs: torch.Tensor, scales) -> torch.Tensor:
    b, _, h, w = inputs.shape
    lams = []
    with torch.no_grad():
        for s in (1.0, *(s for s in scales if s != 1.0)):
            x = inputs if s == 1.0 else F.interpolate(inputs, size=(int(s * h), int(s * w)), mode="bilinear",
                                                      align_corners=False)
            _, _, _x4, _, tokens, _ = network(model, torch.cat([x, x.flip(-1)]))
            lam = torch.einsum("bchw,bkc->bkhw", _x4, tokens)
            lam = F.interpolate(lam, size=(h, w), mode="bilinear", align_corners=False)
            lams.append(torch.max(lam[:b], lam[b:].flip(-1)))
        return _minmax(torch.stack(lams).sum(0))


def cam_to_label(cam: torch.Tensor, cls_label: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """``cam_to_label(..., ignore_mid=True, img_box=None)``'s label."""
    valid = cls_label[:, :, None, None] * cam
    value, label = valid.max(dim=1)
    label = label + 1
    label[value <= high] = 255
    label[value <= low] = 0
    return label


def refine_cams_with_bkg_v2(inputs: torch.Tensor, cams: torch.Tensor, cls_labels: torch.Tensor, high: float,
                            low: float, dilations, num_iter: int = 10, down_scale: int = 2) -> torch.Tensor:
    """PAR-refined segmentation label, per image (img_box None); the image is ``denormalize_img2`` [ToCo]."""
    images = denormalize_uint8(inputs).float() / 255.0
    b, _, h, w = images.shape
    small = F.interpolate(images, size=[h // down_scale, w // down_scale], mode="bilinear", align_corners=False)
    cls_labels = torch.cat([torch.ones(b, 1), cls_labels], dim=1)
    labels = []
    for bkg in (high, low):
        stack = torch.cat([torch.full((b, 1, h, w), bkg), cams], dim=1)
        stack = F.interpolate(stack, size=[h // down_scale, w // down_scale], mode="bilinear", align_corners=False)
        label = torch.full((b, h, w), 255.0)
        for i in range(b):
            key = torch.nonzero(cls_labels[i])[:, 0]
            probs = stack[i, key][None].softmax(dim=1)
            refined = par_refine(small[[i]], probs, dilations=tuple(dilations), num_iter=num_iter, backend="torch")
            refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
            label[i] = key[refined.argmax(dim=1)][0]
        labels.append(label)
    high_label, low_label = labels
    out = high_label.clone()
    out[high_label == 0] = 255
    out[(high_label + low_label) == 0] = 0
    return out.long()


# ---- losses (model/losses.py)


def multi_cls_loss(tokens: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    B, K, _ = tokens.shape
    tokens = F.normalize(tokens, dim=-1)
    logits = torch.matmul(tokens, tokens.permute(0, 2, 1)) / temperature
    return F.cross_entropy(logits, torch.arange(K).unsqueeze(0).repeat(B, 1))


def cle_loss(tokens: torch.Tensor, patch_tokens: torch.Tensor, masks: torch.Tensor, cls_labels: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """``DRELoss_neg``: per image and present class, exp of the logits, the underflow branch, the class mask."""
    b = masks.shape[0]
    tokens = F.normalize(tokens, p=2, dim=2, eps=1e-8)
    patches = patch_tokens.detach().clone()
    logits = torch.exp(torch.matmul(tokens, patches.reshape(b, patches.shape[1], -1)) / temperature)
    total = 0
    for i in range(b):
        loss_i = 0
        for idx in torch.where(cls_labels[i] == 1)[0].tolist():
            logit = logits[i, idx, :]
            if logit.sum() != 0:
                loss = -torch.log(logit / (logit.sum() + 1e-4))
            else:
                loss = -torch.log((1) / (1 + logit.sum() + 1e-4))
            flag = (masks[i] == idx + 1).flatten()
            loss_i = loss_i + (flag * loss).sum() / (flag.sum() + 1e-4)
        total = total + loss_i
    return total / b


def mask2roi(mask: torch.Tensor) -> torch.Tensor:
    mask_ = mask.clone()
    roi = torch.zeros_like(mask, dtype=torch.int16)
    mask_[mask_ == 255] = 0
    roi[mask == 255] = 1
    roi[mask_ >= 1] = 2
    return roi


def uncertain_kernel_search(patch_tokens: torch.Tensor, roi_mask: torch.Tensor, crop_num: int = 8,
                            kernel_size: int = 6, randperm=None, positions: list | None = None) -> list:
    """Per image: the candidates one by one (window mean >= 1.2), the tokens read at the relative index used as an
    absolute one. ``positions``, when a list: each image's selected (row, col) token positions are appended to it."""
    un_tokens = []
    b, _, h, w = patch_tokens.shape
    margin = kernel_size // 2
    iw = w - 2 * margin
    for i1 in range(b):
        chosen = []
        roi_index = (roi_mask[i1, margin:(h - margin), margin:(w - margin)] == 1).nonzero()
        kept = []
        for i2 in range(roi_index.shape[0]):
            h0, w0 = roi_index[i2, 0], roi_index[i2, 1]
            window = roi_mask[i1, h0:(h0 + kernel_size), w0:(w0 + kernel_size)]
            if window.sum() / (kernel_size * kernel_size) >= 1.2:
                kept.append((int(h0), int(w0)))
        if len(kept) > crop_num:
            perm = (torch.randperm(len(kept)) if randperm is None
                    else randperm(i1, [r * iw + q for r, q in kept]))
            chosen = [kept[j] for j in perm[:crop_num].tolist()]
        else:
            add = (crop_num - len(kept)) // 4
            pos = (roi_mask[i1, margin:(h - margin), margin:(w - margin)] == 2).nonzero()
            if pos.shape[0] < add:
                pos = (roi_mask[i1, margin:(h - margin), margin:(w - margin)] >= 0).nonzero()
            perm = (torch.randperm(pos.shape[0]) if randperm is None
                    else randperm(i1, [int(r) * iw + int(q) for r, q in pos]))
            chosen = kept + [(int(pos[j, 0]), int(pos[j, 1])) for j in perm[:add].tolist()]
        if positions is not None:
            positions.append(chosen)
        un_tokens.append(torch.stack([patch_tokens[i1, :, r, q] for r, q in chosen], dim=0))
    return un_tokens


def une_loss(tokens: torch.Tensor, patch_tokens: torch.Tensor, masks: torch.Tensor, cls_labels: torch.Tensor,
             randperm=None) -> torch.Tensor:
    """``SRELoss_neg``: per selected token, |cos| against the detached class tokens."""
    patch_tokens = F.normalize(patch_tokens, p=2, dim=1, eps=1e-8)
    tokens = F.normalize(tokens, p=2, dim=2, eps=1e-8).detach()
    un_embeddings = uncertain_kernel_search(patch_tokens, mask2roi(masks), randperm=randperm)
    background = cls_labels == 0
    total, n = 0, 0
    for idx, embeds in enumerate(un_embeddings):
        for un in embeds:
            s = torch.abs(torch.matmul(un, tokens[idx].transpose(1, 0)))
            total = total + (0.5 * (1 - torch.sum(cls_labels[idx] * s) / (cls_labels[idx].sum() + 1))
                             + 0.5 * torch.sum(background[idx] * s) / (background[idx].sum() + 1))
            n += 1
    return total / n


def label_to_aff_mask(cam_label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    b, h, w = cam_label.shape
    rep = cam_label.reshape(b, 1, -1).repeat([1, h * w, 1])
    aff = (rep == rep.permute(0, 2, 1)).long()
    for i in range(b):
        aff[i, :, rep[i, 0, :] == ignore_index] = ignore_index
        aff[i, rep[i, 0, :] == ignore_index, :] = ignore_index
    aff[:, range(h * w), range(h * w)] = ignore_index
    return aff


def ptc_loss(inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, c, h, w = inputs.shape
    x = F.normalize(inputs.reshape(b, c, h * w), p=2, dim=1, eps=1e-8)
    cos = torch.abs(torch.matmul(x.transpose(1, 2), x))
    pos, neg = mask == 1, mask == 0
    return 0.5 * (1 - torch.sum(pos * cos) / (pos.sum() + 1)) + 0.5 * torch.sum(neg * cos) / (neg.sum() + 1)


def seg_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    bg, fg = label.clone(), label.clone()
    bg[label != 0] = 255
    fg[label == 0] = 255
    bg_loss = F.cross_entropy(pred, bg, ignore_index=255, reduction="sum") / ((bg != 255).long().sum() + 1e-6)
    fg_loss = F.cross_entropy(pred, fg, ignore_index=255, reduction="sum") / ((fg != 255).long().sum() + 1e-6)
    return (bg_loss + fg_loss) * 0.5


# ---- one step (scripts/train_voc.py ``train``; train_coco.py differs only in its schedule)


def permutation_by_keys(keys: torch.Tensor):
    """``randperm(image, positions)`` that orders the positions by decreasing key (``keys`` [B, L], one per inner
    position): the first n are the n of largest key, fastwsss's selection."""
    def randperm(image: int, positions: list) -> torch.Tensor:
        k = keys[image, torch.tensor(positions, dtype=torch.long)] if positions else keys.new_zeros(0)
        return torch.argsort(k, descending=True, stable=True)
    return randperm


def step_terms(model, batch: dict, cfg, step: int, randperm=None) -> dict[str, torch.Tensor]:
    """The unweighted terms and the ``total`` of one official step (fp32). Every term is computed at every step,
    weight 0 included (Q8); a weight is on from the first step the script's ``n_iter <= K`` comparison is false."""
    c, cam, loss = cfg.more, cfg.cam, cfg.loss
    inputs, cls_label = batch["img"], batch["cls_label"]
    if randperm is None and "une_keys" in batch:
        randperm = permutation_by_keys(batch["une_keys"])
    cams, cams_aux = multi_scale_cam2(model, inputs, cam.scales)
    valid_cam = cls_label[:, :, None, None] * cams
    refined = refine_cams_with_bkg_v2(inputs, valid_cam, cls_label, cam.high_thresh, cam.low_thresh,
                                      cam.par_dilations, cam.par_num_iter)
    cls, segs, fmap, cls_aux, tokens, _ = network(model, inputs, with_gcr=c.gcr)
    grid = fmap.shape[2:]
    resized_aux = F.interpolate(cams_aux, size=grid, mode="bilinear", align_corners=False)
    label_cle = cam_to_label(resized_aux, cls_label, c.cle_high_thresh, cam.low_thresh)
    label_aux = cam_to_label(resized_aux, cls_label, cam.high_thresh, cam.low_thresh)
    resized = F.interpolate(cams, size=grid, mode="bilinear", align_corners=False)
    label_late = cam_to_label(resized, cls_label, c.late_high_thresh, c.late_low_thresh)
    early = c.token_label_aux_until is not None and step <= c.token_label_aux_until
    mask_cle = label_cle if early else label_late
    mask_une = label_aux if early else label_late
    terms = {"cls": F.multilabel_soft_margin_loss(cls, cls_label),
             "cls_aux": F.multilabel_soft_margin_loss(cls_aux, cls_label),
             "mct": multi_cls_loss(tokens, c.mct_temperature),
             "cle": cle_loss(tokens, fmap, mask_cle, cls_label, c.cle_temperature),
             "une": une_loss(tokens, fmap, mask_une, cls_label, randperm)}
    segs = F.interpolate(segs, size=refined.shape[1:], mode="bilinear", align_corners=False)
    terms["seg"] = seg_loss(segs, refined)
    B, _, H, W = inputs.shape
    terms["reg"] = reg_loss(segs, denormalize(inputs), torch.tensor([[0, H, 0, W]] * B), refined,
                            sigma_rgb=loss.reg_sigma_rgb, sigma_xy=loss.reg_sigma_xy, scale=loss.reg_scale,
                            backend="torch")
    terms["aff"] = ptc_loss(fmap, label_to_aff_mask(label_aux))
    weights = {"cls": 1.0, "cls_aux": loss.w_cls_aux, "mct": c.w_mct,
               "aff": loss.w_aff if step > loss.aff_start - 1 else 0.0,
               "cle": c.w_cle if step > c.cle_start - 1 else 0.0,
               "une": c.w_une if step > c.une_start - 1 else 0.0,
               "seg": loss.w_seg if step > loss.seg_start - 1 else 0.0,
               "reg": loss.w_reg if step > loss.reg_start - 1 else 0.0}
    terms["total"] = sum(weights[k] * terms[k] for k in weights)
    return terms


def run_step(model, batch: dict, cfg, step: int) -> dict[str, torch.Tensor]:
    """``step_terms`` as ``benchmarks/method_step.py`` calls every official reading."""
    return step_terms(model, batch, cfg, step)


def after_step(model, method, cfg) -> None:
    """Nothing moves after MoRe's optimizer step (no teacher)."""


# ---- inference (tools/infer_seg_voc.py ``_validate``)


def infer_seg(model, inputs: torch.Tensor, scales, size: int = 448) -> torch.Tensor:
    """Per scale the image resized to a square int(size * s), batched with its flip; the decoder's logits upsampled
    to the image, the flip pair summed; the scales fused by element-wise max (one image)."""
    h, w = inputs.shape[-2:]
    seg_list = []
    with torch.no_grad():
        for sc in scales:
            x = F.interpolate(inputs, size=[int(size * sc), int(size * sc)], mode="bilinear", align_corners=False)
            segs = network(model, torch.cat([x, x.flip(-1)], dim=0))[1]
            segs = F.interpolate(segs, size=(h, w), mode="bilinear", align_corners=False)
            seg_list.append(segs[:1] + segs[1:].flip(-1))
    return torch.max(torch.stack(seg_list, dim=0), dim=0)[0]
