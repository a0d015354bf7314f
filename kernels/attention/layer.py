"""timm drop-in self-attention with key masks, the functions that run any timm-style ``Attention`` module
(``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``) through the kernels, and
``block_forward``, a timm ``Block`` with the drop-in's key masks or packed sequences.

No timm import: the layer keeps timm ``Attention``'s constructor, parameter names and forward signature, so
``timm.create_model(..., attn_layer=MaskedKeyAttention)`` works and timm checkpoints load; ``swap_attention``
replaces the ``Attention`` modules of a built model, sharing (not copying) their parameters.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._backend import check_devices, resolve_backend
from .api import masked_key_attention, masked_key_attention_reasons, varlen_attention, varlen_attention_reasons
from .reference import _masked_softmax, visible_keys


def _module_reasons(attn: nn.Module) -> list[str]:
    p = attn.attn_drop.p if isinstance(attn.attn_drop, nn.Dropout) else 0.0
    return [f"attention dropout p={p} in training (the kernels have none)"] if attn.training and p > 0 else []


def _same_dtype(*ts: Tensor) -> tuple[Tensor, ...]:
    """q/k norms run in fp32 under autocast while v comes out of the autocast Linear: meet at the autocast dtype."""
    if len({t.dtype for t in ts}) == 1:
        return ts
    dev = ts[0].device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(
        torch.promote_types(ts[0].dtype, ts[1].dtype), ts[2].dtype)
    return tuple(t.to(dt) for t in ts)


def _heads(attn: nn.Module) -> tuple[int, int, int]:
    num_heads, head_dim = attn.num_heads, attn.head_dim
    return num_heads, head_dim, getattr(attn, "attn_dim", num_heads * head_dim)


def _qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, N, C] -> q, k, v [B, H, N, Dh] (views into one qkv buffer, as timm)."""
    B, N, _ = x.shape
    H, Dh, _ = _heads(attn)
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    return _same_dtype(attn.q_norm(q), attn.k_norm(k), v)


def _project_out(attn: nn.Module, o: Tensor, gate: Tensor | None) -> Tensor:
    o = getattr(attn, "norm", nn.Identity())(o)
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def _gate(attn: nn.Module, x: Tensor) -> Tensor | None:
    gate = getattr(attn, "gate", None)
    return None if gate is None else gate(x).sigmoid()


def _timm_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                    is_causal: bool) -> Tensor:
    """timm ``Attention``'s own computation, unchanged: [B, H, N, Dh] -> [B, H, N, Dh]."""
    if getattr(attn, "fused_attn", True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=attn.attn_drop.p if attn.training else 0.0)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    N = q.shape[-2]
    if is_causal:
        a = a + a.new_full((N, N), float("-inf")).triu_(1)
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        a = a + torch.zeros_like(attn_mask, dtype=a.dtype).masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        a = a + attn_mask
    return attn.attn_drop(a.softmax(dim=-1)) @ v


def _key_keep_from_mask(attn_mask: Tensor, B: int, N: int) -> Tensor | None:
    """A boolean SDPA mask that only masks keys ([B or 1, 1, 1, N]) -> key_keep [B, 1, N]; anything else None."""
    if attn_mask.dtype != torch.bool or attn_mask.ndim != 4 or attn_mask.shape[1:] != (1, 1, N):
        return None
    if attn_mask.shape[0] not in (1, B):
        return None
    return attn_mask[:, 0].expand(B, 1, N)


def attention_forward(attn: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                      key_keep: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Run a timm-style attention module on x [B, N, C] -> [B, N, C_out], or [B, M, N, C_out] for key_keep [B, M, N].

    key_keep [B, N] or [B, M, N] bool (True = visible key; M masks over the same tokens in one pass) or a boolean
    key-only attn_mask [B or 1, 1, 1, N] take the Triton kernel; other masks, ``is_causal`` and attention dropout
    in training take timm's computation (``backend="auto"``) or raise with the reasons (``backend="triton"``).
    With no mask at all, ``backend="auto"`` takes timm's computation too (SDPA, i.e. FlashAttention on a GPU, is
    the tool for unmasked attention; the kernel is for key masks) and so does ``"torch"``: the result is timm's,
    bit for bit. ``backend="triton"`` still runs the kernel, with every key visible. A query whose mask hides every
    key gets 0 from the kernel path.
    """
    op = f"{type(attn).__name__} attention"
    B, N, _ = x.shape
    if key_keep is not None:
        if attn_mask is not None or is_causal:
            raise ValueError(f"{op}: pass key_keep or attn_mask / is_causal, not both")
        if key_keep.dtype != torch.bool or key_keep.ndim not in (2, 3) or key_keep.shape[0] != B \
                or key_keep.shape[-1] != N:
            raise ValueError(f"{op}: key_keep must be bool [B, N] or [B, M, N] with B={B}, N={N}, got "
                             f"{key_keep.dtype} {tuple(key_keep.shape)}")
    if errors := check_devices(x=x, key_keep=key_keep, attn_mask=attn_mask):
        raise ValueError(f"{op}: " + "; ".join(errors))
    gate = _gate(attn, x)
    q, k, v = _qkv(attn, x)
    keep = key_keep if key_keep is None or key_keep.ndim == 3 else key_keep[:, None]
    reasons = ["is_causal=True"] if is_causal else []
    if attn_mask is not None:
        keep = _key_keep_from_mask(attn_mask, B, N)
        if keep is None:
            reasons.append(f"attn_mask {attn_mask.dtype} {tuple(attn_mask.shape)} is not a boolean key mask "
                           "[B or 1, 1, 1, N]")
    reasons += _module_reasons(attn) + masked_key_attention_reasons(q, k, v, keep)
    unmasked = key_keep is None and attn_mask is None and not is_causal
    if resolve_backend("torch" if unmasked and backend == "auto" else backend, op, reasons, x) == "triton":
        o = masked_key_attention(q, k, v, x.new_ones(B, 1, N, dtype=torch.bool) if keep is None else keep,
                                 attn.scale, backend="triton")  # [B, M, H, N, Dh]
    elif key_keep is None:
        o = _timm_attention(attn, q, k, v, attn_mask, is_causal)[:, None]
    else:
        scores = torch.einsum("bhnd,bmhkd->bmhnk", q * attn.scale, visible_keys(k, keep))  # [B, M, H, N, N]
        o = attn.attn_drop(_masked_softmax(scores, keep[:, :, None, None, :])) @ visible_keys(v, keep)
    o = o.transpose(2, 3).reshape(B, o.shape[1], N, -1)  # [B, M, N, H·Dh]
    out = _project_out(attn, o, None if gate is None else gate[:, None])
    return out if key_keep is not None and key_keep.ndim == 3 else out[:, 0]


def masked_self_attention(attn: nn.Module, x: Tensor, key_keep: Tensor, backend: str = "auto") -> Tensor:
    """x [B, N, C] under M key masks key_keep [B, M, N] -> [B, M, N, C_out], q/k/v projected once for all masks."""
    return attention_forward(attn, x, key_keep=key_keep, backend=backend)


def packed_self_attention(attn: nn.Module, x: Tensor, cu_seqlens: Tensor, backend: str = "auto") -> Tensor:
    """Packed sequences x [T, C] (sequence s = rows cu_seqlens[s] : cu_seqlens[s + 1]) -> [T, C_out]: each token
    attends to its own sequence only, through a timm-style attention module's weights."""
    op = f"{type(attn).__name__} packed attention"
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be packed sequences [T, C], got shape {tuple(x.shape)}")
    T = x.shape[0]
    if errors := check_devices(x=x, cu_seqlens=cu_seqlens):
        raise ValueError(f"{op}: " + "; ".join(errors))
    H, Dh, _ = _heads(attn)
    gate = _gate(attn, x)
    q, k, v = attn.qkv(x).reshape(T, 3, H, Dh).unbind(1)  # [T, H, Dh]
    q, k, v = _same_dtype(attn.q_norm(q), attn.k_norm(k), v)
    if resolve_backend(backend, op, _module_reasons(attn) + varlen_attention_reasons(q, k, v, cu_seqlens), x) \
            == "triton":
        o = varlen_attention(q, k, v, cu_seqlens, attn.scale, backend="triton")
    else:
        bounds = cu_seqlens.tolist()
        parts = [_timm_attention(attn, *(t[lo:hi].transpose(0, 1) for t in (q, k, v)), None, False).transpose(0, 1)
                 for lo, hi in pairwise(bounds) if hi > lo]  # [L, H, Dh] each
        o = torch.cat(parts) if parts else q.new_empty(q.shape)
    return _project_out(attn, o.reshape(T, -1), gate)


class MaskedKeyAttention(nn.Module):
    """timm ``Attention`` with Triton masked-key attention: same constructor, parameter names and forward
    signature, plus ``forward(..., key_keep=)`` ([B, N] or [B, M, N] bool, True = visible key) and
    ``forward(x, cu_seqlens=)`` (packed sequences x [T, C], block-diagonal attention: :func:`packed_self_attention`).
    ``backend`` ("auto" | "triton" | "torch") plays the role of timm's ``fused_attn``; see :func:`attention_forward`
    (with "auto", key masks take the kernel, unmasked calls timm's own SDPA). :func:`block_forward` runs a whole
    timm ``Block`` around it with these inputs."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        if head_dim < 1:
            raise ValueError(f"head dim must be >= 1, got {head_dim} (dim {dim}, num_heads {num_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be provided if qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.fused_attn = True  # used only on the torch path, as timm uses it
        self.backend = backend

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_attention(cls, attn: nn.Module, backend: str = "auto") -> MaskedKeyAttention:
        """Wrap a built timm ``Attention``: the new module holds the same submodules (same Parameter objects, so an
        optimizer built before the swap keeps working)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim, new.attn_dim = _heads(attn)
        new.scale = attn.scale
        new.fused_attn = getattr(attn, "fused_attn", True)
        new.backend = backend
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(new, name, getattr(attn, name, nn.Identity()))
        new.gate = getattr(attn, "gate", None)
        return new.train(attn.training)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                key_keep: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
        if cu_seqlens is None:
            return attention_forward(self, x, attn_mask, is_causal, key_keep, self.backend)
        if attn_mask is not None or is_causal or key_keep is not None:
            raise ValueError(f"{type(self).__name__}: cu_seqlens (packed sequences) takes no attn_mask, is_causal or "
                             "key_keep: the sequences are the mask")
        return packed_self_attention(self, x, cu_seqlens, self.backend)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def block_forward(block: nn.Module, x: Tensor, *, key_keep: Tensor | None = None,
                  cu_seqlens: Tensor | None = None) -> Tensor:
    """Run a pre-norm timm ``Block`` whose ``attn`` is a :class:`MaskedKeyAttention`, handing the attention its extra
    inputs: ``x + drop_path1(ls1(attn(norm1(x), ...)))``, then ``x + drop_path2(ls2(mlp(norm2(x))))``.

    - ``key_keep`` [B, M, N] bool (True = visible key): x [B, N, C] -> [B, M, N, C], the M masks over the same tokens
      in one attention call (q, k, v projected once); the residual broadcasts x over the masks, and norm2 / mlp run
      on every mask's tokens. [B, N] -> [B, N, C] (one mask).
    - ``cu_seqlens`` [S + 1] int: packed sequences x [T, C] -> [T, C], each token attending within its own sequence
      (block-diagonal attention); everything else in the block is per token.
    - Neither: ``block(x)``, bit for bit.

    The backend is the attention's ``backend`` attribute. Drop path in training would draw per image (shared by its
    M masks) or per packed token, not per view as separate runs do: refused with a drop probability > 0.
    """
    if key_keep is None and cu_seqlens is None:
        return block(x)
    if key_keep is not None and cu_seqlens is not None:
        raise ValueError("block_forward: pass key_keep or cu_seqlens, not both")
    if missing := [name for name in _BLOCK_PARTS if not hasattr(block, name)]:
        raise TypeError(f"block_forward: {type(block).__name__} is not a pre-norm timm Block (no {', '.join(missing)})")
    if not isinstance(block.attn, MaskedKeyAttention):
        raise TypeError(f"block_forward: block.attn is {type(block.attn).__name__}, key_keep / cu_seqlens need a "
                        "MaskedKeyAttention (swap_attention(model), or timm.create_model(..., "
                        "attn_layer=MaskedKeyAttention))")
    drops = [p for p in (getattr(block.drop_path1, "drop_prob", 0.0), getattr(block.drop_path2, "drop_prob", 0.0))
             if p > 0]
    if block.training and drops:
        raise ValueError(f"block_forward: drop path p={drops[0]} in training draws per image (key_keep) or per packed "
                         "token (cu_seqlens), not per view")
    attn_out = block.attn(block.norm1(x), key_keep=key_keep, cu_seqlens=cu_seqlens)
    if key_keep is not None and key_keep.ndim == 3:
        x = x[:, None]  # [B, 1, N, C]: broadcast over the M masks of attn_out [B, M, N, C]
    x = x + block.drop_path1(block.ls1(attn_out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _is_timm_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "Attention" and type(m).__module__.startswith("timm.")


def swap_attention(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every timm ``Attention`` (that exact class) of a built model by a
    :class:`MaskedKeyAttention` sharing its weights; returns the model. Other attention classes are left alone."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if _is_timm_attention(child):
                setattr(module, name, MaskedKeyAttention.from_attention(child, backend))
    return model

