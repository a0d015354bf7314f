"""The benchmark suites run every case once on this machine (``--benchmark-disable``): each provider's result is
checked against the reference before it could be timed, so a broken provider fails here, not on a GPU later."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, run the suites themselves: --benchmark-only")
def test_every_benchmark_case_runs_once():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-p",
                           "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_demo_seeds_wall_times_round_to_the_second_first():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_seeds

    assert [demo_seeds.mmss(t) for t in (0, 59.4, 59.6, 839.6, 3601)] == ["0:00", "0:59", "1:00", "14:00", "60:01"]


def test_demo_seeds_trains_each_config_per_seed_and_tables_the_margins(synthetic_root, tmp_path, capsys):
    """benchmarks/demo_seeds.py with the tiny model: one row per seed and the mean, the margins computed from the runs'
    results.json, the baseline's pseudo labels scored, per-phase it/s; demo_toco's pseudo labels (high threshold 0.2,
    the baseline's 0.15) compared with the baseline's CAMs labelled as demo_toco labels them; the page's table
    replaced between markers; a second call reuses the runs, a third with another setting retrains them."""
    import json

    from tests.conftest import TINY_OVERRIDES

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_seeds

    page, readme = tmp_path / "demo.md", tmp_path / "README.md"
    page.write_text("# x\n<!-- demo-seeds-table -->\n| seed | stale |\n<!-- /demo-seeds-table -->\nend\n")
    readme.write_text("# r\n<!-- demo-seeds-summary -->\nstale\n<!-- /demo-seeds-summary -->\n")
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("train.log_interval")]
    roomy = ["data.crop_size=48", "model.img_size=48"]  # room for demo_toco's 32-px local crops
    args = ["--seeds", "0,3", "--jobs", "2", "--toco", "--runs-dir", str(tmp_path / "runs"), "--docs", str(page),
            "--readme", str(readme), *tiny, f"data.root={synthetic_root}", "train.max_iters=4", "train.eval_interval=4",
            "train.log_interval=1", "loss.aff_start=2", "loss.con_start=2", "loss.seg_start=2", "loss.reg_start=2",
            *roomy]
    assert demo_seeds.load_config("demo_toco", tiny + roomy).cam.high_thresh == 0.2
    assert demo_seeds.load_config("demo_cam", tiny + roomy).cam.high_thresh == 0.15
    demo_seeds.main(args)
    text = page.read_text()
    assert "stale" not in text and text.endswith("<!-- /demo-seeds-table -->\nend\n")
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines() if line.startswith("| ")}
    assert {"0", "3", "mean"} <= set(rows)
    results = {s: {c: json.loads((tmp_path / "runs" / c / f"seed{s}" / "results.json").read_text())
                   for c in ("demo", "demo_cam", "demo_toco")} for s in (0, 3)}
    from fastwsss import evaluate

    for s, r in results.items():
        cam_dir = tmp_path / "runs" / "demo_cam" / f"seed{s}"
        relabelled = cam_dir / "as_toco.json"  # the baseline's CAMs labelled with demo_toco's high threshold
        evaluate.main(["--checkpoint", str(cam_dir), "--modes", "pseudo", "--json", str(relabelled), "cam.high_thresh=0.2"])
        as_toco = 100 * json.loads(relabelled.read_text())["pseudo"]["miou"]
        margins = []
        for c, versus in (("demo", 100 * r["demo_cam"]["pseudo_miou"]), ("demo_toco", as_toco)):
            margins += [100 * r[c]["seg_miou"] - 100 * r["demo_cam"]["cam_miou"],
                        100 * r[c]["seg-crf_miou"] - 100 * r["demo_cam"]["cam_miou"],  # eval.final_infer
                        100 * r[c]["pseudo_miou"] - versus]
        assert rows[str(s)].rstrip(" |").endswith(" | ".join(f"{m:+.1f}" for m in margins)), rows[str(s)]
        assert f" | {as_toco:.1f} | " in rows[str(s)]
        assert r["demo"]["it_per_s"] and r["demo_cam"]["it_per_s"]
        short = [100 * r[c]["seg_miou"] for c in ("demo", "demo_toco")]
        short += [100 * r[c]["seg-crf_miou"] for c in ("demo", "demo_toco")] + [100 * r["demo_cam"]["cam_miou"]]
        short += [100 * r[c]["pseudo_miou"] for c in ("demo", "demo_toco", "demo_cam")] + [as_toco]
        assert f"| {s} | " + " | ".join(f"{v:.1f}" for v in short) + " |" in readme.read_text()
    assert "demo_cam pseudo as demo_toco's" in text and "labelled with cam.high_thresh 0.2 as demo_toco's" in text
    assert "stale" not in readme.read_text() and "Made by `" in readme.read_text()
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("results.json")}
    demo_seeds.main(args)  # reused, not retrained
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("results.json")} == before
    capsys.readouterr()
    lr = demo_seeds.load_config("demo", tiny).optim.lr
    demo_seeds.main([a if a != "0,3" else "3" for a in args] + [f"optim.lr={2 * lr}"])  # made with other settings
    out = capsys.readouterr().out
    for config in ("demo", "demo_cam", "demo_toco"):
        assert f"{config} seed 3: retrained, its run in {tmp_path / 'runs' / config / 'seed3'} was made with other " \
               f"settings: optim.lr: {lr} -> {2 * lr}" in out, out
        assert f"lr: {2 * lr}\n" in (tmp_path / "runs" / config / "seed3" / "config.yaml").read_text()
    after = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("results.json")}
    assert [p.parent.name for p in after if after[p] != before[p]] == ["seed3"] * 3, after
    assert (tmp_path / "runs" / "demo_cam" / "seed3" / "pseudo_as_demo_toco.json").is_file()  # made again
