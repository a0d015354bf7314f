"""One-shot GPU validation: everything a lent H100 / H200 can prove, in one call of at most ~7 minutes.

    python benchmarks/gpu_validate.py --out DIR [--budget 420] [--commit SHA] [--dry-run]

Stages, each with its share of the budget (a stage that runs out is stopped and reported, the next one still runs):

1. ``selfcheck``  ``python -m fastwsss.kernels --full``: versions, device, backends, every op against its reference
   at a small and a real shape;
2. ``tests``      the whole test suite with real Triton, GPU-marked tests included (pytest-xdist when installed);
3. ``benchmarks`` ``pytest benchmarks/ --benchmark-only`` at the production shapes (correctness checked first);
4. ``training``   one full-size training run per (method, path): ``benchmarks/train_speed.py`` for voc_mcc and
   voc_toco, the fp32 reference path and the bf16 fast path (steady it/s, peak memory), voc_cosa's fast path; and
   ``benchmarks/method_step.py`` per method with an official-step reading (CoSA, MoRe): one iteration of fastwsss's
   step against the plain official step, as a ratio.

Writes ``validate.json`` (device, versions, commit, each stage's status, time and summary, the training table),
``selfcheck.json``, ``benchmarks.json`` and one ``<stage>.log`` per stage into DIR, at most 8 files (what the
device tool brings back). Commit them under ``benchmarks/results/<device>/``. Subprocesses run in a scratch folder,
so the installed fastwsss is what runs, never a shadowing source tree. ``--dry-run`` (CPU, CI) runs every stage at
a tiny size: the selfcheck under the Triton interpreter, a few tests, one benchmark case once, two tiny trainings.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINING = [("voc_mcc", "reference"), ("voc_mcc", "fast"), ("voc_toco", "reference"), ("voc_toco", "fast"),
            ("voc_cosa", "fast")]
METHOD_STEPS = ["cosa", "more"]  # benchmarks/method_step.py --method <name>
SHARES = {"selfcheck": 0.10, "tests": 0.35, "benchmarks": 0.22, "training": 0.33}  # of the budget


def _versions() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("triton", "timm", "fastwsss", "xformers", "pydensecrf2", "numpy"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    return info


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                             check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_stage(name: str, commands: list[list[str]], timeout: float, log: Path, env: dict, cwd: Path) -> dict:
    """Run the commands one after another within ``timeout`` seconds in all; output to ``log``."""
    t0 = time.monotonic()
    rcs = []
    with log.open("w") as f:
        for cmd in commands:
            left = timeout - (time.monotonic() - t0)
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            if left <= 1:
                f.write("[not run: the stage's time is spent]\n")
                rcs.append("not run")
                continue
            try:
                rcs.append(subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                          timeout=left, check=False).returncode)
            except subprocess.TimeoutExpired:
                f.write(f"\n[stopped: the stage's {timeout:.0f} s are spent]\n")
                rcs.append("timeout")
    ok = all(rc == 0 for rc in rcs)
    status = "ok" if ok else ("timeout" if "timeout" in rcs or "not run" in rcs else "failed")
    return {"stage": name, "status": status, "returncodes": rcs, "seconds": round(time.monotonic() - t0, 1)}


def _pytest_summary(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the results (e.g. $OUT on the device)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all stages (default 420)")
    ap.add_argument("--commit", help="the commit being validated (default: git rev-parse HEAD, if there is .git)")
    ap.add_argument("--dry-run", action="store_true", help="every stage at a tiny size, on a CPU (what CI runs)")
    args = ap.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_validate: no CUDA device (use --dry-run for the CPU rehearsal)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("fastwsss.kernels") is None:
        print("gpu_validate: fastwsss is not installed (pip install the wheel first; see benchmarks/README.md)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fastwsss-validate-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    py = sys.executable
    xdist = ["-n", "8"] if importlib.util.find_spec("xdist") and not args.dry_run else []
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
        stages = {
            "selfcheck": [[py, "-m", "fastwsss.kernels", "--json", args.out / "selfcheck.json"]],
            "tests": [[py, "-m", "pytest", REPO / "tests" / "test_schedule.py", "-q", "-p", "no:cacheprovider"]],
            "benchmarks": [[py, "-m", "pytest", REPO / "benchmarks" / "bench_affinity.py", "--benchmark-disable", "-q",
                            "-p", "no:cacheprovider", "-k", "triton"]],
            "training": [[py, REPO / "benchmarks" / "train_speed.py", "--config", c, "--path", p, "--tiny", "--iters",
                          "2", "--data", scratch / "data", "--json", scratch / f"train_{c}_{p}.json"]
                         for c, p in TRAINING[:2]]
                        + [[py, REPO / "benchmarks" / "method_step.py", "--method", m, "--size", "tiny", "--iters", "1",
                            "--json", scratch / f"step_{m}.json"] for m in METHOD_STEPS],
        }
    else:
        stages = {
            "selfcheck": [[py, "-m", "fastwsss.kernels", "--full", "--json", args.out / "selfcheck.json"]],
            "tests": [[py, "-m", "pytest", REPO / "tests", "-q", "-rfE", "-m", "not wheel", "-p", "no:cacheprovider",
                       *xdist]],
            "benchmarks": [[py, "-m", "pytest", REPO / "benchmarks", "--benchmark-only", "-q", "-p",
                            "no:cacheprovider", "--benchmark-json", args.out / "benchmarks.json"]],
            "training": [[py, REPO / "benchmarks" / "train_speed.py", "--config", c, "--path", p, "--iters", "12",
                          "--data", scratch / "data", "--json", scratch / f"train_{c}_{p}.json"] for c, p in TRAINING]
                        + [[py, REPO / "benchmarks" / "method_step.py", "--method", m, "--iters", "5", "--json",
                            scratch / f"step_{m}.json"] for m in METHOD_STEPS],
        }
    report = {"commit": _commit(args.commit), "dry_run": args.dry_run, "budget_s": args.budget,
              "versions": _versions(), "stages": [], "training": [], "method_steps": []}
    out_json = args.out / "validate.json"
    for name, commands in stages.items():
        log = args.out / f"{name}.log"
        print(f"[gpu_validate] {name} ({SHARES[name] * args.budget:.0f} s)", flush=True)
        result = run_stage(name, commands, SHARES[name] * args.budget, log, env, scratch)
        if name in ("tests", "benchmarks"):
            result["summary"] = _pytest_summary(log)
        if name == "training":
            runs = len(commands) - len(METHOD_STEPS)
            for c, p in TRAINING[:runs]:
                f = scratch / f"train_{c}_{p}.json"
                report["training"].append(json.loads(f.read_text()) if f.exists() else {"config": c, "path": p,
                                                                                       "status": "no result"})
            for m in METHOD_STEPS:
                f = scratch / f"step_{m}.json"
                report["method_steps"].append(json.loads(f.read_text()) if f.exists() else {"method": m,
                                                                                          "status": "no result"})
        report["stages"].append(result)
        print(f"[gpu_validate] {name}: {result['status']} in {result['seconds']} s {result.get('summary', '')}",
              flush=True)
        out_json.write_text(json.dumps(report, indent=1))  # after every stage: a timeout keeps what ran
    for t in report["training"]:
        if "it_per_s" in t:
            print(f"[gpu_validate] {t['config']:9s} {t['path']:9s} {t['it_per_s']:.2f} it/s, peak "
                  f"{t['peak_mem_gib']} GiB ({t['precision']}, backend {t['kernels_backend']})")
    for s in report["method_steps"]:
        if "speedup" in s:
            print(f"[gpu_validate] {s['method']} step: fastwsss {s['fast_s_per_iter']} s, official "
                  f"{s['official_s_per_iter']} s per iteration: x{s['speedup']}")
    return 0 if all(s["status"] == "ok" for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
