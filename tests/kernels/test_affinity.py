"""Token affinity loss reference: hand-computed values, a pair-by-pair loop, and the properties callers rely on."""

from __future__ import annotations

import pytest
import torch

try:
    from fastwsss.kernels.affinity import token_affinity_loss
except ModuleNotFoundError:  # not installed: run from the repository root
    from kernels.affinity import token_affinity_loss

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
    loss = token_affinity_loss(feats, labels)
    assert loss.dtype == dtype and loss.shape == ()
    torch.testing.assert_close(loss, token_affinity_loss(feats.detach().float(), labels).to(dtype), rtol=0, atol=0)
    loss.backward()
    assert feats.grad.dtype == dtype and torch.isfinite(feats.grad).all()


def test_backend_dispatch():
    feats, labels = torch.randn(1, 4, 3), torch.tensor([[0, 1, 1, 255]])
    assert token_affinity_loss(feats, labels, backend="torch") == token_affinity_loss(feats, labels, backend="auto")
    with pytest.raises(ValueError, match="no Triton kernel for token_affinity_loss yet"):
        token_affinity_loss(feats, labels, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        token_affinity_loss(feats, labels, backend="cuda")


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="feats must be \\[B, N, D\\]"):
        token_affinity_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be \\[B, N\\]"):
        token_affinity_loss(torch.randn(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        token_affinity_loss(torch.randn(1, 4, 3), torch.zeros(1, 4))
