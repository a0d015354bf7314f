"""``fastwsss.kernels.testing``: each criterion of ``assert_close`` at its boundary, non-finite values, ``where``,
the failure message, and ``error``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastwsss.kernels.testing import assert_close, error, natural_image

REF = torch.tensor([3.0, -4.0, 0.0, 1.0])  # rms 2.55, max |ref| 4


def fails(out, ref=REF, *args, **kw) -> bool:
    try:
        assert_close(out, ref, *args, **kw)
    except AssertionError:
        return True
    return False


def test_rms_scale_is_relative_with_a_floor_at_the_rms():
    rms = float(REF.pow(2).mean().sqrt())
    step = 1e-3 * (REF.abs().double() + rms)  # the bound at tol 1e-3
    assert not fails(REF.double() + 0.999 * step, REF.double(), 1e-3)
    assert fails(REF.double() + 1.001 * step * torch.tensor([0.0, 0.0, 1.0, 0.0]), REF.double(), 1e-3)
    assert not fails(REF + 0.09, tol=1.0, floor=0.1, rtol=0)  # floor above the rms: max(2.55, 0.1) -> 2.55
    assert fails(torch.full((2,), 0.05), torch.zeros(2), 0.4, floor=0.1)  # rms 0: 0.4 * 0.1 = 0.04 < 0.05
    assert not fails(torch.full((2,), 0.04), torch.zeros(2), 0.5, floor=0.1)


def test_max_scale_is_relative_to_the_largest_value():
    assert not fails(REF + 0.04, tol=1e-2, rtol=0, scale="max")  # 0.04 <= 1e-2 * 4
    assert fails(REF + 0.041, tol=1e-2, rtol=0, scale="max")


def test_one_scale_is_isclose():
    for out in (REF + 1e-6, REF * (1 + 1e-5) + 2e-6, REF + torch.tensor([0.0, 0.0, 1.1e-6, 0.0])):
        assert fails(out, rtol=1e-5, atol=1e-6, scale="one") == (not torch.isclose(out, REF, 1e-5, 1e-6).all())


def test_non_finite_values():
    inf, nan = math.inf, math.nan
    assert not fails(torch.tensor([inf, 1.0]), torch.tensor([inf, 1.0]))  # equal values pass
    assert fails(torch.tensor([inf, 1.0]), torch.tensor([-inf, 1.0]), 1.0)
    assert fails(torch.tensor([inf, 1.0]), torch.tensor([2.0, 1.0]), 1e9)
    assert fails(torch.tensor([nan, 1.0]), torch.tensor([2.0, 1.0]), 1e9)  # an unwritten (NaN-filled) element
    assert fails(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0]), 1.0)
    assert not fails(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.0]), equal_nan=True)
    assert fails(torch.tensor([1.0, 1.0]), torch.tensor([nan, 1.0]), 1e9, equal_nan=True)


def test_where_and_the_message():
    out = REF.clone()
    out[1], out[3] = -4.5, 1.5
    assert not fails(out, tol=0.2, rtol=0.2, atol=0, where=torch.tensor([True, True, True, False]))
    with pytest.raises(AssertionError, match=r"^thing: 1 of 3 elements beyond .*worst at \(3,\): ref 1, out 1\.5$"):
        assert_close(out, REF, what="thing", rtol=0.2, atol=0, where=torch.tensor([True, False, True, True]))
    with pytest.raises(AssertionError, match=r"1 of 4 elements .* worst at \(3,\)"):
        assert_close(out, REF, 0.1, "x")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(REF[:3], REF)
    assert_close(np.asarray(REF), REF)  # numpy arrays (the densecrf oracle's) are taken too


def test_error_is_the_smallest_passing_tol():
    out = REF + torch.tensor([0.1, 0.0, -0.2, 0.0])
    e = error(out, REF)
    assert e == pytest.approx(0.2 / float(REF.pow(2).mean().sqrt()))
    assert not fails(out, REF, e * (1 + 1e-12), equal_nan=True) and fails(out, REF, e * (1 - 1e-6))
    assert error(torch.tensor([math.nan]), torch.tensor([math.nan])) == 0.0
    assert error(torch.tensor([math.nan]), torch.tensor([1.0])) == math.inf
    assert error(torch.empty(0), torch.empty(0)) == 0.0


def test_natural_image():
    img = natural_image(17, 23, seed=3)
    assert img.shape == (17, 23, 3) and img.dtype == np.uint8
    assert np.array_equal(img, natural_image(17, 23, seed=3)) and not np.array_equal(img, natural_image(17, 23, 4))
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # not flat: a lattice as large as a photograph's
