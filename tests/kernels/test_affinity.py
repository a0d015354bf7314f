"""Token affinity loss: the reference against hand-computed values and a pair-by-pair loop, the properties callers
rely on, and the Triton kernels (forward and backward) against the reference."""

from __future__ import annotations

import pytest
import torch

from fastwsss.kernels import _backend
from fastwsss.kernels.affinity import pair_counts, token_affinity_loss, token_affinity_sums_reference
from fastwsss.kernels.testing import DEVICE, assert_close

from parity import nan_filled

# x̂ = (1, 0), (-0.6, 0.8), (0, 1): cosines c12 = -0.6, c13 = 0, c23 = 0.8
HAND = torch.tensor([[[2.0, 0.0], [-3.0, 4.0], [0.0, 5.0]]])


def loop_sums(feats, labels, absolute=True, ignore_index=255):
    """(Σ_P s, |P|, Σ_Nn s, |Nn|) pair by pair, in Python floats."""
    sp = np_ = sn = nn_ = 0.0
    for x, y in zip(feats.double().tolist(), labels.tolist(), strict=True):
        xh = [[v / max(sum(u * u for u in xi) ** 0.5, 1e-8) for v in xi] for xi in x]
        for i in range(len(x)):
            for j in range(len(x)):
                if i == j or ignore_index in (y[i], y[j]):
                    continue
                c = sum(a * b for a, b in zip(xh[i], xh[j], strict=True))
                s = abs(c) if absolute else c
                if y[i] == y[j]:
                    sp, np_ = sp + s, np_ + 1
                else:
                    sn, nn_ = sn + s, nn_ + 1
    return sp, np_, sn, nn_


def loop_loss(feats, labels, absolute=True, ignore_index=255):
    sp, np_, sn, nn_ = loop_sums(feats, labels, absolute, ignore_index)
    return 0.5 * (1 - sp / (np_ + 1)) + 0.5 * sn / (nn_ + 1)


def test_hand_computed():
    labels = torch.tensor([[1, 1, 2]])
    # P = (1,2), (2,1): s = 0.6 each; Nn = (1,3), (3,1): 0 and (2,3), (3,2): 0.8 each
    # absolute: 0.5·(1 − 1.2/3) + 0.5·1.6/5 = 0.3 + 0.16 = 0.46
    torch.testing.assert_close(token_affinity_loss(HAND, labels), torch.tensor(0.46))
    # plain cosine: 0.5·(1 − (−1.2)/3) + 0.5·1.6/5 = 0.7 + 0.16 = 0.86
    torch.testing.assert_close(token_affinity_loss(HAND, labels, absolute=False), torch.tensor(0.86))
    # a fourth, ignored token forms no pair
    feats4 = torch.cat([HAND, torch.tensor([[[7.0, -1.0]]])], dim=1)
    torch.testing.assert_close(token_affinity_loss(feats4, torch.tensor([[1, 1, 2, 255]])), torch.tensor(0.46))
    torch.testing.assert_close(token_affinity_loss(feats4, torch.tensor([[1, 1, 2, 9]]), ignore_index=9),
                               torch.tensor(0.46))


def test_all_pairs_ignored():
    feats = torch.randn(2, 5, 4)
    # 0.5·(1 − 0/1) + 0.5·0/1
    torch.testing.assert_close(token_affinity_loss(feats, torch.full((2, 5), 255)), torch.tensor(0.5))


def test_no_positive_pair():
    # every label distinct: P empty, Nn = all 6 ordered pairs: 0.5·(1 − 0/1) + 0.5·2·(0.6 + 0 + 0.8)/7 = 0.5 + 0.2
    torch.testing.assert_close(token_affinity_loss(HAND, torch.tensor([[0, 1, 2]])), torch.tensor(0.7))


@pytest.mark.parametrize("absolute", [True, False])
def test_matches_a_pair_by_pair_loop(absolute):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (3, 9), generator=g)
    labels[labels == 2] = 255
    want = loop_loss(feats, labels, absolute)
    torch.testing.assert_close(token_affinity_loss(feats, labels, absolute=absolute),
                               torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14)


def test_pairs_never_cross_images():
    """Two images with identical labels: counts and sums add over images; tokens of different images never pair."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 2, 255]] * 2)
    s = [loop_sums(feats[b:b + 1], labels[b:b + 1]) for b in range(2)]
    sp, np_, sn, nn_ = (a + b for a, b in zip(*s, strict=True))
    assert (np_, nn_) == (8, 32)  # per image: 5 valid tokens, 2 + 2 positive and 5·4 − 4 negative ordered pairs
    want = 0.5 * (1 - sp / (np_ + 1)) + 0.5 * sn / (nn_ + 1)
    got = token_affinity_loss(feats, labels)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14)
    merged = token_affinity_loss(feats.reshape(1, 12, 4), labels.reshape(1, 12))  # what cross-image pairs would give
    assert abs(merged.item() - got.item()) > 1e-3


def test_zero_vector_is_guarded():
    feats = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]]], requires_grad=True)
    loss = token_affinity_loss(feats, torch.tensor([[0, 0, 1]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()


@pytest.mark.parametrize("absolute", [True, False])
def test_gradcheck_float64(absolute):
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 0, 1, 2, 255, 1], [3, 3, 3, 0, 1, 255]])
    assert torch.autograd.gradcheck(lambda f: token_affinity_loss(f, labels, absolute=absolute), (feats,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_in_same_dtype_out(dtype):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 16, 8, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 4, (2, 16), generator=g)
    loss = token_affinity_loss(feats, labels, backend="torch")
    assert loss.dtype == dtype and loss.shape == ()
    want = token_affinity_loss(feats.detach().float(), labels, backend="torch").to(dtype)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    loss.backward()
    assert feats.grad.dtype == dtype and torch.isfinite(feats.grad).all()


def test_backend_dispatch():
    feats, labels = torch.randn(1, 4, 3), torch.tensor([[0, 1, 1, 255]])
    torch.testing.assert_close(token_affinity_loss(feats, labels, backend="torch"),
                               token_affinity_loss(feats, labels, backend="auto"))
    # float64 is the reference's exact mode: auto falls back silently, an explicit triton lists every reason
    assert token_affinity_loss(feats.double(), labels, backend="auto").dtype == torch.float64
    with pytest.raises(ValueError, match="cannot take these inputs: feats dtype torch.float64.*; empty feats"):
        token_affinity_loss(feats.double()[:, :0], labels[:, :0], backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        token_affinity_loss(feats, labels, backend="cuda")


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="feats must be \\[B, N, D\\]"):
        token_affinity_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be \\[B, N\\]"):
        token_affinity_loss(torch.randn(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        token_affinity_loss(torch.randn(1, 4, 3), torch.zeros(1, 4))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_labels_outside_the_classes_are_errors(backend):
    """Before: −1 and 1000 were ordinary classes. A negative label other than ignore_index is an error on every
    backend; with num_classes, so is a label >= num_classes. The message gives the count and the values."""
    feats = torch.randn(2, 5, 4, device=DEVICE)
    labels = torch.tensor([[0, 1, 255, 2, 2], [3, 3, 0, 255, 1]], device=DEVICE)
    want = token_affinity_loss(feats, labels, backend="torch")
    assert_close(token_affinity_loss(feats, labels, num_classes=4, backend=backend), want, 1e-6, "valid labels")
    negative = labels.clone()
    negative[0, 1] = -1
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.C-1 or ignore_index=255.*1 label.*-1"):
        token_affinity_loss(feats, negative, backend=backend)
    too_big = labels.clone()
    too_big[1, :2] = 1000
    too_big[0, 0] = -7
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.3 or ignore_index=255.*3 labels.*-7.*1000"):
        token_affinity_loss(feats, too_big, num_classes=4, backend=backend)
    token_affinity_loss(feats, too_big.clamp_min(0), backend=backend)  # without num_classes, any label >= 0 is a class
    other_ignore = labels.masked_fill(labels == 255, -100)  # another ignore_index, negative
    assert_close(token_affinity_loss(feats, other_ignore, ignore_index=-100, num_classes=4, backend=backend), want,
                 1e-6, "ignore_index=-100")
    other_ignore[0, 1] = -1
    with pytest.raises(ValueError, match=r"ignore_index=-100, got 1 label outside: min -1"):
        token_affinity_loss(feats, other_ignore, ignore_index=-100, backend=backend)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        token_affinity_loss(feats, labels, num_classes=0, backend=backend)


# ------------------------------------------------------------------------------------- Triton kernels vs reference
# Under TRITON_INTERPRET=1 (tests/conftest.py) these run the kernels on CPU; on a GPU, with real Triton.
# The kernels and the reference both compute in fp32 from the same (possibly rounded) inputs, so the tolerances only
# cover summation order in fp32 and, for half dtypes, one ulp of the output rounding: (rtol, atol) per dtype.
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}


@pytest.fixture
def kernels(monkeypatch):
    """The Triton module, with fresh outputs NaN-filled so an unwritten element cannot pass."""
    pytest.importorskip("triton")
    return nan_filled(monkeypatch, "affinity")


def make_case(B, N, D, dtype, seed=0, shared=0.0, num_labels=4, device=DEVICE):
    """feats [B, N, D] (+ `shared`·one common direction, as ViT tokens have: keeps every |cos| away from 0, where
    |·|'s subgradient flips on rounding), labels [B, N] with ~1/(num_labels+1) ignored."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, N, D, generator=g) + shared * torch.randn(D, generator=g)
    labels = torch.randint(0, num_labels + 1, (B, N), generator=g)
    labels[labels == num_labels] = 255
    return feats.to(device=device, dtype=dtype), labels.to(device)


def parity(feats, labels, absolute=True, grad=True):
    """Triton loss and gradient against the reference's autograd on the same inputs."""
    rtol, atol = TOL[feats.dtype]
    f1, f2 = feats.clone().requires_grad_(grad), feats.clone().requires_grad_(grad)
    out = token_affinity_loss(f1, labels, absolute=absolute, backend="triton")
    ref = token_affinity_loss(f2, labels, absolute=absolute, backend="torch")
    assert out.dtype == ref.dtype == feats.dtype and out.shape == ()
    assert_close(out, ref, what="loss", rtol=rtol, atol=atol, scale="one")
    if grad:
        out.backward()
        ref.backward()
        assert f1.grad.dtype == feats.dtype
        scale = f2.grad.abs().max().item()  # gradients are ~w·√N small: tolerance relative to their size
        assert_close(f1.grad, f2.grad, what="grad", rtol=rtol, atol=rtol * scale + 1e-30, scale="one")


CASES = [  # (B, N, D, shared, absolute); the larger sizes run one sign mode only (interpreter time)
    pytest.param(2, 10, 8, 0.0, True, id="B2-N10-D8-tiny-abs"),
    pytest.param(2, 10, 8, 0.0, False, id="B2-N10-D8-tiny-cos"),
    pytest.param(3, 1, 4, 0.0, True, id="B3-N1-D4-one-token"),
    pytest.param(2, 150, 40, 0.0, True, id="B2-N150-D40-ragged-abs"),  # N, D not multiples of any block size
    pytest.param(2, 150, 40, 0.0, False, id="B2-N150-D40-ragged-cos"),
    pytest.param(1, 200, 768, 1.0, True, id="B1-N200-D768-vit"),
    pytest.param(1, 784, 64, 1.0, True, id="B1-N784-D64-grid28"),  # the 28×28 token grid of a 448 crop
]


@pytest.mark.parametrize("B, N, D, shared, absolute", CASES)
def test_triton_matches_reference(kernels, B, N, D, shared, absolute):
    parity(*make_case(B, N, D, torch.float32, shared=shared), absolute=absolute)


@pytest.mark.parametrize("sms", [1, 7], ids=["split1", "split2"])
def test_triton_backward_column_split(kernels, monkeypatch, sms):
    """The backward splits each row block's column blocks over `split` programs (from the SM count): one program
    accumulating all 7 column blocks of N = 784 (read-modify-write of its rows), and 2 programs with 4 and 3."""
    monkeypatch.setattr(_backend, "num_sms", lambda device: sms)
    parity(*make_case(1, 784, 64, torch.float32, seed=2, shared=1.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_inputs(kernels, dtype):
    """The kernels read fp32 x̂ normalised from the rounded inputs (no bf16 arithmetic, so the interpreter is exact)."""
    parity(*make_case(2, 70, 24, dtype, seed=1))


@pytest.mark.gpu
@pytest.mark.parametrize("N", [784, 1764])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_real_shapes_gpu(N, dtype):
    """ViT-B/16 tokens of a 448 crop (28² = 784) and of 672 (42² = 1764), D 768, batch 4."""
    parity(*make_case(4, N, 768, dtype, seed=2, shared=1.0))
    parity(*make_case(2, N, 768, dtype, seed=3), absolute=False)


def test_triton_edge_cases(kernels):
    feats = make_case(2, 37, 16, torch.float32)[0]
    # every pair ignored: L = 0.5 and a zero gradient
    f = feats.clone().requires_grad_()
    loss = token_affinity_loss(f, torch.full((2, 37), 255, device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.5 and (f.grad == 0).all()
    # no positive pair (all labels distinct within each image), and only positive pairs (one label)
    distinct = torch.arange(37, device=DEVICE).expand(2, 37).contiguous()
    parity(feats, distinct)
    parity(feats, torch.zeros(2, 37, dtype=torch.long, device=DEVICE))
    # the hand-computed case, int32 / uint8 labels, another ignore_index
    torch.testing.assert_close(token_affinity_loss(HAND.to(DEVICE), torch.tensor([[1, 1, 2]], dtype=torch.int32,
                                                   device=DEVICE), backend="triton").cpu(), torch.tensor(0.46))
    labels = torch.tensor([[1, 1, 2, 9]], dtype=torch.uint8, device=DEVICE)
    feats4 = torch.cat([HAND, torch.tensor([[[7.0, -1.0]]])], dim=1).to(DEVICE)
    torch.testing.assert_close(token_affinity_loss(feats4, labels, ignore_index=9, backend="triton").cpu(),
                               torch.tensor(0.46))


def test_triton_zero_vector_gradient(kernels):
    """‖x‖ < eps: the gradient is u / eps, as through F.normalize's clamp (a large but finite value)."""
    feats = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [1e-9, 0.0]]], device=DEVICE)
    parity(feats, torch.tensor([[0, 0, 1, 1]], device=DEVICE))


def test_triton_is_deterministic_and_non_contiguous(kernels):
    feats, labels = make_case(2, 140, 32, torch.float32, seed=4)
    wide = feats.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, D] view with D-stride 1 ≠ contiguous
    outs = []
    for _ in range(2):
        f = wide.clone().requires_grad_()
        loss = token_affinity_loss(f, labels, backend="triton")
        loss.backward()
        outs.append((loss, f.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    parity(wide, labels)


def test_custom_op_passes_opcheck(kernels):
    from torch.library import opcheck

    feats, labels = make_case(2, 20, 8, torch.float32, seed=5)
    xhat = torch.nn.functional.normalize(feats, dim=-1).requires_grad_()
    lab = labels.to(torch.int32)
    opcheck(torch.ops.fastwsss.token_affinity_sums.default, (xhat, lab, True, 255))
    opcheck(torch.ops.fastwsss.token_affinity_sums.default, (xhat.detach(), lab, False, 255))
    grad = torch.tensor([1.0, 0.0, -2.0, 0.0], dtype=torch.float64, device=DEVICE)
    opcheck(torch.ops.fastwsss.token_affinity_sums_backward.default, (grad, xhat.detach(), lab, True, 255))


def test_triton_under_torch_compile(kernels):
    """fullgraph capture through the custom op (aot_eager: the graph, without inductor's ~30 s CPU compile)."""
    feats, labels = make_case(2, 20, 8, torch.float32, seed=6)
    f1, f2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    fn = torch.compile(lambda f: token_affinity_loss(f, labels, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    out = fn(f1)
    out.backward()
    ref = token_affinity_loss(f2, labels, backend="torch")
    ref.backward()
    assert_close(out, ref, what="loss", rtol=1e-5, atol=1e-6, scale="one")
    assert_close(f1.grad, f2.grad, what="grad", rtol=1e-5, atol=1e-5 * f2.grad.abs().max().item(), scale="one")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sums_of_parts_add_up_to_the_batch(kernels, backend):
    """A batch split in two (processes, micro-batches) gives sums and gradients that add up to the whole batch's:
    what normalising a split batch by its total counts rests on."""
    from fastwsss.kernels.affinity import loss_from_sums, token_affinity_sums

    feats, labels = make_case(4, 60, 24, torch.float32, seed=5, shared=1.0)
    whole = feats.clone().requires_grad_()
    parts = [feats[:2].clone().requires_grad_(), feats[2:].clone().requires_grad_()]
    s_whole = token_affinity_sums(whole, labels, backend=backend)
    s_parts = [token_affinity_sums(p, labels[i * 2:(i + 1) * 2], backend=backend) for i, p in enumerate(parts)]
    assert_close(s_parts[0] + s_parts[1], s_whole, what="sums", rtol=1e-6, atol=1e-6, scale="one")
    n_p, n_n = s_whole[1].detach(), s_whole[3].detach()  # the total counts, as an all-reduce would give them
    loss_from_sums(s_whole).backward()
    for s in s_parts:  # each part: its sums over the total counts, the constant split between the parts
        (0.5 * (0.5 - s[0] / (n_p + 1)) + 0.5 * s[2] / (n_n + 1)).backward()
    assert_close(torch.cat([p.grad for p in parts]), whole.grad, what="grad", rtol=1e-5, atol=1e-7, scale="one")


def test_pair_counts_are_the_sizes_of_the_pair_masks():
    """The step's denominators (known before any similarity) are the counts the sums report."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (3, 40), generator=g)
    labels[torch.rand(3, 40, generator=g) < 0.3] = 255
    labels[1] = 255  # an image with no labelled token
    sums = token_affinity_sums_reference(torch.randn(3, 40, 8, generator=g, dtype=torch.float64), labels)
    assert torch.equal(pair_counts(labels, num_classes=5), sums[[1, 3]])
