"""Fast path of the regularisation loss: with ``kernels.backend=triton`` the gated dense-CRF loss filters on the Triton
permutohedral lattice (the interpreter on CPU), and a few training steps give the same losses as the reference."""

from __future__ import annotations

import json
import math

import pytest

import fastwsss.methods.losses as fk  # the reg loss looks PermutohedralLattice up here
from fastwsss.training import train

_LATTICE = fk.PermutohedralLattice
STEPS = 3
OVERRIDES = ["train.method=toco", "train.max_iters=100", f"train.stop_at={STEPS}", "train.log_interval=1",
             "train.eval_interval=100", "train.ckpt_interval=100", "loss.seg_start=0", "loss.reg_start=0", "toco.crop_size=16",
             "contrast.proj_hidden=64", "contrast.proj_bottleneck=16", "contrast.proj_dim=32", "contrast.num_local=3"]


def _losses(tiny_config, tmp_path, monkeypatch, backend: str) -> tuple[list[dict], list[str]]:
    """Per-step logged losses, and the backend of every lattice the reg loss built."""
    built = []

    class Spy(_LATTICE):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            built.append(self.backend)

    monkeypatch.setattr(fk, "PermutohedralLattice", Spy)
    train(tiny_config(*OVERRIDES, f"kernels.backend={backend}", f"run.dir={tmp_path / backend}"))
    lines = [json.loads(x) for x in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x], built


def test_reg_loss_through_triton_lattice_matches_reference(tiny_config, tmp_path, monkeypatch):
    ref, ref_built = _losses(tiny_config, tmp_path, monkeypatch, "torch")
    fast, fast_built = _losses(tiny_config, tmp_path, monkeypatch, "triton")
    assert ref_built == ["torch"] * STEPS and fast_built == ["triton"] * STEPS
    assert [x["step"] for x in fast] == [x["step"] for x in ref] == list(range(1, STEPS + 1))
    for r, f in zip(ref, fast):
        assert math.isfinite(r["reg"]) and r["reg"] != 0
        # float32 lattice vs the float64 reference: ~1e-6 relative on the loss; the steps before add ~1e-6 drift
        assert f["reg"] == pytest.approx(r["reg"], rel=1e-4), (r["step"], r["reg"], f["reg"])
        for term in ("cls", "seg", "aff", "con"):
            assert f[term] == pytest.approx(r[term], rel=1e-4, abs=1e-6), (r["step"], term, r[term], f[term])


@pytest.mark.parametrize("exact_grad", [False, True], ids=["reference-grad", "exact-grad"])
def test_reg_loss_value_and_gradient_triton_vs_torch(exact_grad):
    """reg_loss alone, float32 logits: the same value and gradient through either lattice, with the reference's
    gradient and with the exact one (which filters the reverse way on the same lattice)."""
    import torch

    from fastwsss.methods.losses import reg_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 20, 26, generator=g)
    images = torch.randint(0, 256, (2, 3, 20, 26), generator=g).float()
    box = torch.tensor([[0, 20, 0, 26], [2, 18, 4, 26]])
    label = torch.randint(0, 4, (2, 20, 26), generator=g)
    label[:, :3] = 255
    out = {}
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        loss = reg_loss(x, images, box, label, sigma_rgb=15.0, sigma_xy=20.0, exact_grad=exact_grad, backend=backend)
        loss.backward()
        out[backend] = loss.detach(), x.grad
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=0)
    scale = out["torch"][1].abs().max()
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-4, atol=1e-5 * float(scale))
