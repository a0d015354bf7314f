"""The training fast path of the pairwise ops: with ``kernels.backend`` selecting Triton, PAR (the
segmentation pseudo label) and the token affinity loss run through the kernels — under the interpreter on CPU — and
a few training steps give the same losses as through the PyTorch references.

The regularisation loss goes through the lattice filter, whose kernels are tested with it; it is off here so that
this test compares exactly the two ops it is about.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from fastwsss.kernels._backend import INTERPRET
from fastwsss.training import train

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")

STEPS = 3
# fp32 on a GPU too: under bf16 autocast both paths round the same fp32 loss to bf16, where one ulp is 0.4%
OVERRIDES = [f"train.max_iters={STEPS}", "train.precision=fp32", "train.log_interval=1", "train.eval_interval=100", "train.ckpt_interval=100",
             "loss.aff_start=0", "loss.seg_start=0", "loss.w_reg=0", "contrast.proj_hidden=64",
             "contrast.proj_bottleneck=16", "contrast.proj_dim=32", "contrast.num_local=3"]
TERMS = ("cls", "cls_aux", "aff", "seg", "con")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the launches of the Triton PAR and affinity-loss kernels."""
    import fastwsss.kernels.affinity._triton
    import fastwsss.kernels.par._triton  # noqa: F401

    calls = dict.fromkeys(("par_affinity", "par_propagate", "affinity_sums", "affinity_backward"), 0)

    def counted(suffix, name, key):
        # every imported copy: a test that imports the folder as `kernels` as well as `fastwsss.kernels` loads the
        # package twice, and the custom op then runs the copy imported last
        for module_name, module in list(sys.modules.items()):
            if module_name.endswith(suffix):
                fn = getattr(module, name)

                def wrapper(*args, _fn=fn, **kwargs):
                    calls[key] += 1
                    return _fn(*args, **kwargs)

                monkeypatch.setattr(module, name, wrapper)

    counted(".par._triton", "par_affinity", "par_affinity")
    counted(".par._triton", "par_propagate", "par_propagate")
    counted(".affinity._triton", "token_affinity_sums", "affinity_sums")
    counted(".affinity._triton", "token_affinity_sums_backward", "affinity_backward")
    return calls


def run(tiny_config, tmp_path, backend: str) -> tuple[list[dict], dict]:
    result = train(tiny_config("train.method=mcc", *OVERRIDES, f"kernels.backend={backend}",
                               f"run.dir={tmp_path / backend}"))
    lines = [json.loads(x) for x in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x and "cls" in x], result


def test_training_steps_match_through_the_kernels(tiny_config, tmp_path, kernel_calls):
    ref_steps, ref_result = run(tiny_config, tmp_path, "torch")
    assert not any(kernel_calls.values())
    # "auto" is what training uses by default: on CPU under the interpreter (on CUDA natively) it picks Triton
    steps, result = run(tiny_config, tmp_path, "auto")
    # every step: one PAR (both background thresholds at once), one loss forward and backward; plus the final eval
    assert kernel_calls["affinity_sums"] == kernel_calls["affinity_backward"] == STEPS
    assert kernel_calls["par_affinity"] >= STEPS and kernel_calls["par_propagate"] == kernel_calls["par_affinity"]
    assert [x["step"] for x in steps] == [x["step"] for x in ref_steps] == list(range(1, STEPS + 1))
    for got, want in zip(steps, ref_steps, strict=True):
        for term in TERMS:
            assert math.isfinite(want[term]) and want[term] != 0, (term, want)
            # fp32 summation order only; the steps after the first also carry the weights' tiny differences
            assert got[term] == pytest.approx(want[term], rel=1e-4, abs=1e-6), (got["step"], term, got, want)
    assert result["pseudo_miou"] == pytest.approx(ref_result["pseudo_miou"], abs=1e-3)
