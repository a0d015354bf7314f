import pytest

from fastwsss.training import lr_multiplier


@pytest.mark.parametrize("step, expected", [(0, 6e-11), (199, 7.96e-6), (1500, 5.59e-5), (19999, 8.08e-9)])
def test_poly_warmup_schedule(step, expected):
    lr = 6e-5 * lr_multiplier(step, max_iters=20000, warmup_iters=1500, warmup_ratio=1e-6, power=0.9)
    assert lr == pytest.approx(expected, rel=2e-3)


def test_schedule_is_continuous_and_decays_to_zero():
    f = lambda s: lr_multiplier(s, max_iters=20000, warmup_iters=1500, warmup_ratio=1e-6, power=0.9)
    assert f(1499) == pytest.approx(f(1500), rel=0.08)
    assert f(20000) == 0.0
    assert all(f(s) > f(s + 1) for s in range(1500, 19999, 997))
