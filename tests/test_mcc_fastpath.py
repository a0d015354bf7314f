"""MCC's local views through the attention kernels (packed token dropping; the Triton interpreter on CPU) train
exactly like the reference masked forward (views replicated, keys masked in every block)."""

from __future__ import annotations

import json

import pytest

from fastwsss.methods import mcc
from fastwsss.training import train

# contrast on from step 0; the terms that use other kernels (affinity, PAR, lattice) off, so `kernels.backend`
# switches only the local views; stop after 3 of 100 iterations: same lr schedule, no evaluation
COMMON = ["train.method=mcc", "train.max_iters=100", "train.stop_at=3", "train.log_interval=1",
          "train.eval_interval=1000", "train.ckpt_interval=1000", "loss.w_aff=0", "contrast.num_local=3",
          "contrast.proj_hidden=64", "contrast.proj_bottleneck=16", "contrast.proj_dim=32"]


def _losses(run_dir) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k in ("step", "cls", "cls_aux", "con")} for x in lines if "con" in x]


def test_mcc_steps_through_the_kernels_match_the_reference(tiny_config, tmp_path, monkeypatch):
    calls = []
    packed = mcc.packed_class_tokens
    monkeypatch.setattr(mcc, "packed_class_tokens", lambda *a, **k: calls.append(1) or packed(*a, **k))
    train(tiny_config(*COMMON, "kernels.backend=torch", "mcc.forward=masked", f"run.dir={tmp_path / 'ref'}"))
    assert not calls
    train(tiny_config(*COMMON, "kernels.backend=triton", "mcc.forward=drop", f"run.dir={tmp_path / 'fast'}"))
    assert len(calls) == 3  # one packed local-view forward per step
    ref, fast = _losses(tmp_path / "ref"), _losses(tmp_path / "fast")
    assert [x["step"] for x in ref] == [x["step"] for x in fast] == [1, 2, 3]
    for r, f in zip(ref, fast, strict=True):
        for term in ("cls", "cls_aux", "con"):
            assert f[term] == pytest.approx(r[term], rel=1e-5, abs=1e-6), (r["step"], term, r[term], f[term])
