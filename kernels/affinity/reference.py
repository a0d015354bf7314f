"""Token affinity loss: ToCo's patch token contrast (PTC) and MCC's affinity loss, the exact PyTorch reference.

It builds the [B, N, N] similarity and pair masks: clear, and the oracle for a fused kernel that never does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pair_masks(labels: Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """labels [B, N] -> (positive, negative) bool [B, N, N]; pairs never cross images, never i = j, never ignored."""
    n = labels.shape[1]
    valid = labels != ignore_index
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=labels.device)
    same = labels[:, :, None] == labels[:, None, :]
    return pair & same, pair & ~same


def pair_counts(labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """labels [B, N] -> [|P|, |Nn|] (float64), the sizes of ``pair_masks`` without building them:
    |P| = Σ_b (Σ_c n_bc² − n_b), |Nn| = Σ_b (n_b² − Σ_c n_bc²), n_bc the tokens of image b labelled c, n_b its
    labelled tokens. What a part of a batch contributes to the loss's denominators, known before any similarity."""
    valid = labels != ignore_index
    n_bc = F.one_hot(labels.masked_fill(~valid, 0).long(), num_classes).mul(valid[..., None]).sum(1).double()
    n_b = n_bc.sum(1)
    same = n_bc.pow(2).sum(1)
    return torch.stack([(same - n_b).sum(), (n_b.pow(2) - same).sum()])


def token_affinity_sums_reference(feats: Tensor, labels: Tensor, absolute: bool = True,
                                  ignore_index: int = 255) -> Tensor:
    """feats [B, N, D], labels [B, N] (int) -> [Σ_P s, |P|, Σ_Nn s, |Nn|] in promote_types(dtype, float32), with
    s_ij = |x̂_i · x̂_j| (plain cosine if not `absolute`), x̂ = F.normalize(feats, eps=1e-8), and P / Nn the positive
    / negative ordered pairs of the batch."""
    ct = torch.promote_types(feats.dtype, torch.float32)
    x = F.normalize(feats.to(ct), p=2, dim=-1, eps=1e-8)
    sim = x @ x.transpose(1, 2)
    if absolute:
        sim = sim.abs()
    pos, neg = pair_masks(labels, ignore_index)
    zero = sim.new_zeros(())
    return torch.stack([torch.where(pos, sim, zero).sum(), pos.sum().to(ct), torch.where(neg, sim, zero).sum(),
                        neg.sum().to(ct)])


def loss_from_sums(sums: Tensor, parts: int = 1) -> Tensor:
    """[Σ_P s, |P|, Σ_Nn s, |Nn|] -> L = 0.5·(1 − Σ_P s / (|P| + 1)) + 0.5·Σ_Nn s / (|Nn| + 1).

    ``parts`` > 1: the share of one of ``parts`` parts of a batch (processes, micro-batches) whose sums Σ_P s, Σ_Nn s
    are the part's own and whose counts |P|, |Nn| are the whole batch's; the constant 0.5 is split evenly, so the
    parts' shares add up to the whole batch's loss."""
    sp, n_p, sn, n_n = sums.unbind()
    return 0.5 * (1 / parts - sp / (n_p + 1)) + 0.5 * sn / (n_n + 1)


def token_affinity_loss_reference(feats: Tensor, labels: Tensor, absolute: bool = True,
                                  ignore_index: int = 255) -> Tensor:
    """feats [B, N, D], labels [B, N] (int) -> scalar in the feats' dtype: ``loss_from_sums`` of the batch's sums."""
    return loss_from_sums(token_affinity_sums_reference(feats, labels, absolute, ignore_index)).to(feats.dtype)
