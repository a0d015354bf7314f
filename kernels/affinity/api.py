"""Public token affinity loss: validate, pick the backend, run.

The Triton path normalises in PyTorch (so autograd applies the normalisation's Jacobian, exactly as in the
reference) and hands x̂ to the custom op ``fastwsss::token_affinity_sums``, whose kernels return the four pair sums
(Σ_P s, |P|, Σ_Nn s, |Nn|) and, in the backward, ∂/∂x̂ — never an N×N matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import TRITON_DTYPES, check_devices, device_reasons, resolve_backend
from .reference import loss_from_sums, token_affinity_sums_reference


@torch.library.custom_op("fastwsss::token_affinity_sums", mutates_args=())
def _sums_op(xhat: Tensor, labels: Tensor, absolute: bool, ignore_index: int) -> Tensor:
    """xhat [B, N, D] fp32 contiguous, labels [B, N] int32 -> [Σ_P s, |P|, Σ_Nn s, |Nn|] float64 (Triton)."""
    from . import _triton

    return _triton.token_affinity_sums(xhat, labels, absolute, ignore_index)


@_sums_op.register_fake
def _(xhat, labels, absolute, ignore_index):
    return xhat.new_empty(4, dtype=torch.float64)


@torch.library.custom_op("fastwsss::token_affinity_sums_backward", mutates_args=())
def token_affinity_sums_backward(grad: Tensor, xhat: Tensor, labels: Tensor, absolute: bool,
                                 ignore_index: int) -> Tensor:
    """grad [4] of the sums -> ∂/∂xhat [B, N, D] fp32 (Triton)."""
    from . import _triton

    return _triton.token_affinity_sums_backward(grad, xhat, labels, absolute, ignore_index)


@token_affinity_sums_backward.register_fake
def _(grad, xhat, labels, absolute, ignore_index):
    return torch.empty_like(xhat)


def _setup_context(ctx, inputs, output):
    xhat, labels, absolute, ignore_index = inputs
    ctx.save_for_backward(xhat, labels)
    ctx.absolute, ctx.ignore_index = absolute, ignore_index


def _backward(ctx, grad):
    xhat, labels = ctx.saved_tensors
    dx = token_affinity_sums_backward(grad, xhat, labels, ctx.absolute, ctx.ignore_index) \
        if ctx.needs_input_grad[0] else None
    return dx, None, None, None


_sums_op.register_autograd(_backward, setup_context=_setup_context)


def token_affinity_reasons(feats: Tensor, labels: Tensor) -> list[str]:
    """Why the Triton path of ``token_affinity_loss`` / ``token_affinity_sums`` cannot take these (valid) inputs
    ([] = it can)."""
    reasons = device_reasons(feats, labels)
    if feats.dtype not in TRITON_DTYPES:
        reasons.append(f"feats dtype {feats.dtype} (the kernels compute in float32; the reference runs {feats.dtype})")
    if feats.numel() == 0:
        reasons.append(f"empty feats {tuple(feats.shape)}")
    return reasons


def _check_inputs(op: str, feats: Tensor, labels: Tensor) -> None:
    if feats.ndim != 3:
        raise ValueError(f"{op}: feats must be [B, N, D], got shape {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise TypeError(f"{op}: feats must be floating point, got {feats.dtype}")
    if labels.shape != feats.shape[:2]:
        raise ValueError(f"{op}: labels must be [B, N] = {tuple(feats.shape[:2])}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    if errors := check_devices(feats=feats, labels=labels):
        raise ValueError(f"{op}: " + "; ".join(errors))


def token_affinity_sums(feats: Tensor, labels: Tensor, absolute: bool = True, ignore_index: int = 255,
                        backend: str = "auto", *, num_classes: int | None = None) -> Tensor:
    """The four pair sums the loss is made of: feats [B, N, D], labels [B, N] -> [Σ_P s, |P|, Σ_Nn s, |Nn|]
    (float64 from the kernels, promote_types(dtype, float32) from the reference), differentiable w.r.t. feats.

    What a part of a batch contributes: sums of parts add up to the whole batch's, so a batch split over processes
    or micro-batches is normalised by the total counts (``token_affinity_loss`` is ``loss_from_sums`` of these).
    Labels are checked as ``token_affinity_loss`` checks them."""
    op = "token_affinity_sums"
    _check_inputs(op, feats, labels)
    _check_labels(op, labels, ignore_index, num_classes)
    if resolve_backend(backend, op, token_affinity_reasons(feats, labels), feats, labels) == "triton":
        xhat = F.normalize(feats.float(), p=2, dim=-1, eps=1e-8).contiguous()  # [B, N, D] fp32, as the reference
        return _sums_op(xhat, labels.to(torch.int32).contiguous(), absolute, ignore_index)
    return token_affinity_sums_reference(feats, labels, absolute, ignore_index)


def _check_labels(op: str, labels: Tensor, ignore_index: int, num_classes: int | None) -> None:
    """Every label in 0..num_classes−1 (any label >= 0 without num_classes) or ignore_index: one combined check,
    one host sync (the details of a failure cost more, only then); none inside a compiled graph."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"{op}: num_classes must be an int >= 1, got {num_classes!r}")
    outside = labels < 0
    if num_classes is not None:
        outside |= labels >= num_classes
    elif labels.dtype == torch.int64:
        outside |= labels > torch.iinfo(torch.int32).max  # the kernels read int32 labels
    outside &= labels != ignore_index
    classes = "C-1" if num_classes is None else num_classes - 1
    if torch.compiler.is_compiling():  # a graph cannot branch on data: an asynchronous assertion, without values
        torch._assert_async(~outside.any(), f"{op}: labels must be in 0..{classes} or ignore_index={ignore_index}")
        return
    if not bool(outside.any()):
        return
    bad = labels[outside]
    raise ValueError(f"{op}: labels must be in 0..{classes} or ignore_index={ignore_index}, got {bad.numel()} "
                     f"label{'s' * (bad.numel() > 1)} outside: min {int(bad.min())}, max {int(bad.max())}"
                     + ("" if num_classes is not None else " (without num_classes, labels below 0 and above int32 "
                                                           "are the ones caught)"))


def token_affinity_loss(feats: Tensor, labels: Tensor, absolute: bool = True, ignore_index: int = 255,
                        backend: str = "auto", *, num_classes: int | None = None) -> Tensor:
    """Token affinity loss (ToCo PTC / MCC aff) over the token pairs of each image.

    feats [B, N, D] (any float dtype), labels [B, N] int (ignore_index = no pair) -> scalar in the feats' dtype:
    L = 0.5·(1 − Σ_P s / (|P| + 1)) + 0.5·Σ_Nn s / (|Nn| + 1), s_ij = |cos(x_i, x_j)| (plain cosine if not
    `absolute`); P / Nn = ordered same- / different-label pairs i ≠ j of the same image, counted over the batch.
    Labels must be class indices or ignore_index: a negative one is an error, and so is one >= ``num_classes``
    when it is given (one host sync checks both, on every backend).
    """
    _check_inputs("token_affinity_loss", feats, labels)
    sums = token_affinity_sums(feats, labels, absolute, ignore_index, backend, num_classes=num_classes)
    return loss_from_sums(sums).to(feats.dtype)
