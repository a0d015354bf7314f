"""Permutohedral-lattice bilateral filter in plain PyTorch: Krähenbühl's densecrf lattice, vectorised and batched.

``PermutohedralLattice(features)`` does densecrf's ``Permutohedral::init`` for every image of a batch at once;
``.filter(values)`` does ``Permutohedral::compute``. The lattice coordinates are computed in float32 in the same
order of operations as the C++ code (so the rounding decisions, which tie on integer-valued images, are the same);
splat, blur and slice accumulate in float64. The C++ hash table is replaced by a sort: every lattice vertex gets
one int64 code (image index and key, mixed radix), ``torch.unique`` numbers the distinct vertices, and
``torch.searchsorted`` on the sorted codes finds the blur neighbours. Splat, blur and slice are then stored as
sparse CSR matrices. See README.md for the math.

Everything here is a torch op (no compiled extension): it runs on CPU and CUDA, and ``filter`` is differentiable
w.r.t. the values (each sparse product's backward is the product with the stored transpose); the features get no
gradient.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["PermutohedralLattice"]

_CODE_LIMIT = 1 << 62  # the int64 mixed-radix codes must stay below this (neighbour shifts included)
# The keys are rounded from float32 elevated coordinates: exact while every |elevated coordinate| < 2^24 (float32's
# integers). Beyond, the rounded coordinates no longer sum to a point of the lattice and ranks fall outside 0..d
# (measured: d = 1..14, random features swept from 2^14 to 2^26 — no invalid point below 2^24, invalid ones from
# there on; before this check, an index error deep in the build).
KEY_LIMIT = 1 << 24


def _scale_factors(d: int) -> torch.Tensor:
    """densecrf: ``float inv_std_dev = sqrt(2.0/3.0)*(d+1)``; ``scale_factor[i] = 1.0/sqrt((i+2)*(i+1)) *
    inv_std_dev`` evaluated in double, stored as float32."""
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))  # stored as float
    return torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)], dtype=torch.float64
                        ).to(torch.float32)


def _elevation_bound(amax: list[float], d: int) -> float:
    """max_j |elevated_j| can reach given each channel's max |f_k| = amax[k]: elevated_j = Σ_{k>=j} cf_k − j·cf_{j−1},
    cf_k = f_k·scale_k (densecrf's elevation, below)."""
    s = _scale_factors(d).tolist()
    cf = [a * sk for a, sk in zip(amax, s, strict=True)]
    return max(sum(cf[j:]) + (j * cf[j - 1] if j else 0.0) for j in range(d + 1))


def check_features(f: torch.Tensor) -> tuple[list[float], list[float]]:
    """f [B, d, N] float32 lattice features -> each channel's (min, max) over the batch, with one host sync.

    Raises ValueError for NaN / ±inf, and for features whose elevated coordinates could reach ``KEY_LIMIT`` = 2^24,
    beyond which the float32 coordinates cannot be rounded to the lattice's integer keys (for d = 5, densecrf's
    bilateral kernel, max |f| < 1.89e6 always passes: features are in units of their sigma). Both backends check."""
    d = f.shape[1]
    if f.numel() == 0:
        return [0.0] * d, [0.0] * d
    lo, hi = torch.stack([f.amin(dim=(0, 2)), f.amax(dim=(0, 2))]).tolist()
    bad = [str(i) for i in range(d) if not (math.isfinite(lo[i]) and math.isfinite(hi[i]))]
    if bad:
        raise ValueError(f"PermutohedralLattice: features must be finite, got NaN or ±inf in channel"
                         f"{'s' * (len(bad) > 1)} {', '.join(bad)} of {d}")
    bound = _elevation_bound([max(-a, b) for a, b in zip(lo, hi, strict=True)], d)
    if bound * (1 + 1e-6) >= KEY_LIMIT:  # the margin: float32 rounding of the elevation itself
        safe = KEY_LIMIT / _elevation_bound([1.0] * d, d)
        raise ValueError(f"PermutohedralLattice: features too large for the lattice's integer keys: the elevated "
                         f"coordinates may reach {bound:.3g}, the keys are exact below 2^24 = {KEY_LIMIT} (float32 "
                         f"integers); with {d} channels, max |feature| below {safe:.3g} always passes (features are "
                         f"in units of their sigma)")
    return lo, hi


def _lattice_coordinates(f: torch.Tensor):
    """Per point: rem0 (the closest 0-coloured lattice point), rank and barycentric weights.

    ``f``: [d, P] float32 features. Returns ``rem0`` [d+1, P] int64, ``rank`` [d+1, P] int64 and ``bary``
    [P, d+1] float32, exactly as densecrf's SSE ``Permutohedral::init`` (the build pydensecrf ships on x86-64).
    """
    d, P = f.shape
    dev = f.device
    scale = _scale_factors(d).to(dev)
    f32 = torch.float32

    # Elevate: y = E f  (float32, densecrf's order of operations)
    elevated = torch.empty(d + 1, P, dtype=f32, device=dev)
    sm = torch.zeros(P, dtype=f32, device=dev)
    for j in range(d, 0, -1):
        cf = f[j - 1] * scale[j - 1]
        elevated[j] = sm - torch.tensor(float(j), dtype=f32, device=dev) * cf
        sm = sm + cf
    elevated[0] = sm

    # Closest 0-coloured point: round(elevated / (d+1)) * (d+1). densecrf's SSE build uses _mm_cvtps_epi32 under
    # _MM_ROUND_NEAREST, i.e. round half to EVEN, which is what torch.round does.
    down = torch.tensor(1.0 / (d + 1), dtype=f32, device=dev)  # 1.0f / (d+1)
    up = torch.tensor(float(d + 1), dtype=f32, device=dev)
    rd = torch.round(elevated * down)  # [d+1, P] float32, integer valued
    rem0 = rd * up
    total = rd.sum(0)  # small integers: exact in float32 whatever the order

    # rank[i] = position of coordinate i in the sorted order of (elevated - rem0)
    diff = elevated - rem0  # float32
    rank = torch.zeros(d + 1, P, dtype=torch.int64, device=dev)
    for i in range(d):
        for j in range(i + 1, d + 1):
            c = (diff[i] < diff[j]).to(torch.int64)
            rank[i] += c
            rank[j] += 1 - c

    # Bring the point back onto the plane sum(x) = 0
    rank = rank + total.to(torch.int64)
    rem0 = rem0.to(torch.int64)
    neg = rank < 0
    over = rank > d
    shift = (d + 1) * (neg.to(torch.int64) - over.to(torch.int64))
    rank = rank + shift
    rem0 = rem0 + shift

    # Barycentric coordinates, accumulated in float32 in densecrf's order
    bary = torch.zeros(P, d + 2, dtype=f32, device=dev)
    rem0_f = rem0.to(f32)  # exact: small integers
    for i in range(d + 1):
        v = ((elevated[i] - rem0_f[i]) * down).unsqueeze(1)
        p = (d - rank[i]).unsqueeze(1)
        bary.scatter_add_(1, p, v)
        bary.scatter_add_(1, p + 1, -v)
    bary[:, 0] = bary[:, 0] + (1.0 + bary[:, d + 1])  # float32: barycentric[0] += 1 + barycentric[d+1]
    return rem0, rank, bary[:, : d + 1]


class _SparseMatmul(torch.autograd.Function):
    """``A @ x`` for a constant sparse ``A`` whose transpose ``At`` is stored too. torch's own backward of a CSR
    product re-sorts ``A^T`` into CSR on every call (seconds at 224x224); here it is one more product. Its backward
    is this same op, so it is differentiable any number of times."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, At: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.mats = (A, At)
        return A @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        A, At = ctx.mats
        return None, None, _SparseMatmul.apply(At, A, grad)


def check_values(values: torch.Tensor, B: int, H: int, W: int, device: torch.device) -> None:
    """The values a lattice of B images of H x W on ``device`` can filter: [B, C, H, W] floating point."""
    if values.dim() != 4 or values.shape[0] != B or tuple(values.shape[2:]) != (H, W):
        raise ValueError(f"values must be [{B}, C, {H}, {W}], got shape {tuple(values.shape)}")
    if values.device != device:
        raise ValueError(f"PermutohedralLattice.filter: values and the lattice's features must be on one device, got "
                         f"values on {values.device}, features on {device}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")


class PermutohedralLattice:
    """One permutohedral lattice per image of a batch, built once and reused for many filters.

    ``features``: [B, F, H, W], already divided by their standard deviations (densecrf's bilateral kernel:
    x/sxy, y/sxy, r/srgb, g/srgb, b/srgb). Coordinates are computed in float32 (other dtypes are cast).

    ``filter(values)`` approximates ``out_i = sum_j exp(-||f_i - f_j||^2 / 2) v_j`` (self included, no
    normalisation) over the pixels of the same image, the way densecrf does: ~0.5-0.55x the exact sum on image
    features (README.md).

    ``densecrf_padding`` (default True) reproduces a quirk of densecrf's SSE build: it processes points in blocks of
    4 and, when H*W is not a multiple of 4, also inserts the lattice vertices of the 1-3 all-zero feature vectors
    that pad the last block. Those vertices receive no splat but do carry blurred mass between their neighbours,
    so to agree with pydensecrf they must exist here too. False gives the "clean" lattice.
    """

    def __init__(self, features: torch.Tensor, densecrf_padding: bool = True, *, _force_row_hash: bool = False):
        if features.dim() != 4:
            raise ValueError(f"features must be [B, F, H, W], got shape {tuple(features.shape)}")
        B, d, H, W = features.shape
        if d < 1:
            raise ValueError("features need at least one channel")
        self.batch, self.d, self.height, self.width = B, d, H, W
        N = H * W
        self.num_pixels = N
        dev = features.device
        self.device = dev

        f = features.detach().to(torch.float32).reshape(B, d, N)
        check_features(f)
        pad = (-N) % 4 if densecrf_padding else 0
        if pad:
            f = torch.cat([f, f.new_zeros(B, d, pad)], dim=2)
        Np = N + pad
        P = B * Np
        f = f.permute(1, 0, 2).reshape(d, P)  # point p = b * Np + n

        rem0, rank, bary = _lattice_coordinates(f)  # [d+1, P], [d+1, P], [P, d+1]
        img = torch.arange(B, device=dev).repeat_interleave(Np)  # [P]

        # key of vertex r, coordinate i (i < d): rem0[i] + canonical[r][rank[i]], where
        # canonical[r][k] = r if k <= d - r else r - (d+1)
        rem0 = rem0[:d]
        rank_d = rank[:d]
        lo = rem0.amin(1) - 2 * d - 1  # [d] margins so that keys +- the blur shifts stay in range
        hi = rem0.amax(1) + 2 * d + 1
        spans = [int(s) for s in (hi - lo + 1).tolist()] if P > 0 else [1] * d
        total = B
        for s in spans:
            total *= s
        use_codes = total < _CODE_LIMIT and not _force_row_hash

        if use_codes:
            strides = []
            acc = 1
            for s in reversed(spans):
                strides.append(acc)
                acc *= s
            strides = strides[::-1]  # coordinate i has stride strides[i]; the image index has stride acc
            img_stride = acc
            base = img * img_stride
            for i in range(d):
                base = base + (rem0[i] - lo[i]) * strides[i]
            codes = torch.empty(P, d + 1, dtype=torch.int64, device=dev)
            for r in range(d + 1):
                c = base.clone()
                for i in range(d):
                    c += (r - (d + 1) * (rank_d[i] > d - r).to(torch.int64)) * strides[i]
                codes[:, r] = c
            uniq, inverse = torch.unique(codes.reshape(-1), sorted=True, return_inverse=True)
            M = uniq.numel()
            # blur neighbours n1: k - 1 everywhere except n1[j] = k[j] + d (j < d)
            sum_strides = sum(strides)
            n1 = torch.empty(d + 1, M, dtype=torch.int64, device=dev)
            for j in range(d + 1):
                delta = -sum_strides + ((d + 1) * strides[j] if j < d else 0)
                q = uniq + delta
                pos = torch.searchsorted(uniq, q).clamp_(max=max(M - 1, 0))
                n1[j] = torch.where(uniq[pos] == q, pos, torch.full_like(pos, M))
        else:
            # General path (huge key ranges): hash whole key rows with torch.unique(dim=0).
            keys = torch.empty(P, d + 1, d + 1, dtype=torch.int64, device=dev)
            keys[:, :, 0] = img.unsqueeze(1)
            for r in range(d + 1):
                for i in range(d):
                    keys[:, r, i + 1] = rem0[i] + r - (d + 1) * (rank_d[i] > d - r).to(torch.int64)
            uniq, inverse = torch.unique(keys.reshape(-1, d + 1), dim=0, return_inverse=True)
            M = uniq.shape[0]
            n1 = torch.empty(d + 1, M, dtype=torch.int64, device=dev)
            for j in range(d + 1):
                shift = torch.full((d + 1,), -1, dtype=torch.int64, device=dev)
                shift[0] = 0
                if j < d:
                    shift[j + 1] = d
                allk, inv = torch.unique(torch.cat([uniq, uniq + shift]), dim=0, return_inverse=True)
                lookup = torch.full((allk.shape[0],), M, dtype=torch.int64, device=dev)
                lookup[inv[:M]] = torch.arange(M, device=dev)
                n1[j] = lookup[inv[M:]]

        # n2, the opposite shift, is the inverse map of n1: n1(a) = b  <=>  n2(b) = a (M = not in the lattice)
        nbrs = torch.stack([n1, torch.full_like(n1, M)], dim=1)  # [d+1, 2, M]
        every = torch.arange(M, device=dev)
        for j in range(d + 1):
            found = n1[j] < M
            nbrs[j, 1, n1[j, found]] = every[found]

        inverse = inverse.reshape(B, Np, d + 1)[:, :N]  # drop the padding points: they are never splatted
        offsets = inverse.reshape(B * N, d + 1)  # vertex index of each pixel's d+1 simplex corners (all distinct)
        weights = bary.reshape(B, Np, d + 1)[:, :N].reshape(B * N, d + 1).to(torch.float64)
        self.num_vertices = M
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))
        self.offsets, self.weights = offsets, weights
        self.neighbors = nbrs  # [d+1, 2, M]: blur neighbours n1, n2 per axis; M = "not in the lattice"
        self._build_operators()

    def _build_operators(self) -> None:
        """The filter is ``alpha * T @ B_d @ ... @ B_0 @ S``, with sparse CSR matrices (float64): splat S [M, BN],
        blur B_j = I + (P_j + P_j^T) / 2 [M, M] (P_j: the n1 shift along axis j; the n2 shift is its transpose, so
        B_j is symmetric) and slice T = S^T [BN, M]. Sparse-dense products are several times faster on CPU than
        index_add / row gathers; autograd multiplies by the stored transposes (see ``_SparseMatmul``)."""
        offsets, weights, M, d = self.offsets, self.weights, self.num_vertices, self.d
        P = offsets.shape[0]
        dev = offsets.device
        flat = offsets.reshape(-1)
        pix = torch.arange(P, device=dev).repeat_interleave(d + 1)
        wflat = weights.reshape(-1)
        counts = torch.bincount(flat, minlength=M)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            # splat: row = vertex, columns = the pixels touching it (a stable sort keeps them ascending)
            order = torch.argsort(flat, stable=True)
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            self._splat = torch.sparse_csr_tensor(crow, pix[order], wflat[order], size=(M, P))
            # slice: row = pixel, columns = its d+1 vertices in ascending order
            order = torch.argsort(pix * M + flat)
            crow = torch.arange(0, P * (d + 1) + 1, d + 1, device=dev)
            self._slice = torch.sparse_csr_tensor(crow, flat[order], wflat[order], size=(P, M))
            # blur along each of the d+1 lattice axes; a neighbour that is not in the lattice (index M) is dropped
            self._blur = []
            diag = torch.arange(M, device=dev)
            for j in range(d + 1):
                a, b = self.neighbors[j, 0], self.neighbors[j, 1]
                lo, hi = torch.minimum(a, b), torch.maximum(a, b)
                cols = torch.stack([torch.minimum(lo, diag), torch.maximum(torch.minimum(hi, diag), lo),
                                    torch.maximum(hi, diag)], 1)  # 3-element sorting network
                keep = cols < M
                vals = torch.where(cols == diag.unsqueeze(1), 1.0, 0.5).to(torch.float64)
                crow = torch.cat([counts.new_zeros(1), keep.sum(1).cumsum(0)])
                kept = keep.flatten().nonzero().squeeze(1)  # one nonzero for both gathers
                self._blur.append(torch.sparse_csr_tensor(crow, cols.flatten()[kept], vals.flatten()[kept],
                                                          size=(M, M)))

    def filter(self, values: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W]: splat, blur along the d+1 lattice axes (reverse: in the opposite order,
        which is the transpose of the forward filter), slice, times alpha = 1/(1+2^-d). Accumulates in float64,
        returns ``values.dtype``; differentiable w.r.t. ``values``."""
        B, H, W, N = self.batch, self.height, self.width, self.num_pixels
        check_values(values, B, H, W, self.device)
        C = values.shape[1]
        v = values.to(torch.float64).reshape(B, C, N).transpose(1, 2).reshape(B * N, C)
        lat = _SparseMatmul.apply(self._splat, self._slice, v)
        for j in (range(self.d, -1, -1) if reverse else range(self.d + 1)):
            lat = _SparseMatmul.apply(self._blur[j], self._blur[j], lat)  # B_j is symmetric
        out = _SparseMatmul.apply(self._slice, self._splat, lat) * self.alpha
        return out.reshape(B, N, C).transpose(1, 2).reshape(B, C, H, W).to(values.dtype)
