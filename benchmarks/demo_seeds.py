"""The demo and its CAM baseline over several training seeds: does the method's segmentation beat the baseline's CAM
for every seed, not just one?

    python benchmarks/demo_seeds.py --seeds 0-4 --jobs 2 --toco --docs docs/demo.md --readme README.md

Trains each config (default: ``demo`` = MCC and ``demo_cam`` = its CAM baseline; ``--toco`` adds ``demo_toco``) once
per seed (``train.seed``; the synthetic data, ``data.synthetic.seed``, stays fixed, so every run sees the same
images), ``--jobs`` runs at a time with ``--threads`` torch threads each (OMP_NUM_THREADS), then prints a markdown
table with one row per seed and their mean: each method's segmentation mIoU (no labels at test time; single scale,
and by the papers' test protocol, seg-crf, where the config sets eval.final_infer), CAM and pseudo-label mIoU
(given the image labels), the baseline's CAM and pseudo-label mIoU, the two trivial baselines (all-bg, likely-cls)
and the margins seg - baseline CAM, seg-crf - baseline CAM and pseudo - baseline pseudo. Pseudo labels are compared
made the same way: where a method config labels its CAMs with other settings than the baseline's (``cam.high_thresh``,
``cam.low_thresh``, PAR's), the baseline's CAMs are labelled with the method's settings too (``python -m
fastwsss.evaluate --modes pseudo`` on its checkpoint, cached in its run directory), and the table shows that column
beside the baseline's own. A second table gives each
run's wall time and iterations per second in its first phase (classification only) and its last (every term on),
as the run measured them (``results.json``'s ``it_per_s``: training time only), with the load average when the run
started and ended, so a slow machine can be told apart from slow code. ``--out`` writes both tables (and the
command) to a file, ``--docs docs/demo.md`` puts them into that page, ``--readme README.md`` a short table
(each method's segmentation and the baseline's CAM, then the pseudo labels, per seed and their mean) into that one.

The numbers are each run's final evaluation (``<run dir>/results.json``). Runs go to
``<runs-dir>/<config>/seed<N>``; a run that has its results.json is reused (``--fresh`` retrains it), an interrupted
one is resumed, unless it was made with other settings than the command's (its config.yaml against the config and
overrides, compared as a resume compares them): then it is retrained, and the output says which settings changed.
``key=value`` arguments after the options override every run's config (e.g. ``eval.max_images=100`` for a quick
look; ``data.root=...`` to place the data elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastwsss.config import load_config, resume_changes
from fastwsss.data import open_splits
from fastwsss.methods import METHODS  # importing it registers the methods a config may name


def parse_seeds(text: str) -> list[int]:
    """"0-4" -> [0, 1, 2, 3, 4]; "0,3,7" -> [0, 3, 7]; "0-2,5" -> [0, 1, 2, 5]; "3" -> [3]."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def settings_changed(config: str, seed: int, run_dir: Path, overrides: list[str]) -> list[str]:
    """What this command would train differently from the run already in ``run_dir`` (its saved config.yaml),
    ``"key: old -> new"``: the settings a resume refuses (``resume_changes``). Such a run is neither reused nor
    resumed: a table must not show a run of last week's config. [] where no run was saved."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    wanted = load_config(config, [f"train.seed={seed}", f"run.dir={run_dir}", *overrides])
    return resume_changes(load_config(saved), wanted)[1]


def run_logged(cmd: list[str], run_dir: Path, threads: int, makes: Path, what: str) -> None:
    """Run ``cmd`` with ``threads`` torch threads, its output appended to ``<run_dir>/console.txt``; it must exit 0
    and leave ``makes``, else RuntimeError naming ``what`` and the console file."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir / "console.txt", "a") as console:
        proc = subprocess.run(cmd, env=env, stdout=console, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not makes.is_file():
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): see {run_dir / 'console.txt'}")


def run_one(config: str, seed: int, run_dir: Path, overrides: list[str], threads: int, fresh: bool) -> dict:
    """Train one config at one seed (or reuse its results); returns its results, wall time and loads."""
    results = run_dir / "results.json"
    changed = [] if fresh else settings_changed(config, seed, run_dir, overrides)
    if changed:
        print(f"{config} seed {seed}: retrained, its run in {run_dir} was made with other settings: "
              + "; ".join(changed), flush=True)
    if (fresh or changed) and run_dir.exists():
        shutil.rmtree(run_dir)
    info_path = run_dir / "demo_seeds.json"
    if results.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        return {**info, "results": json.loads(results.read_text()), "reused": True}
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    cmd = [sys.executable, "-m", "fastwsss.train",
           *([f"run.resume={run_dir}"] if resume else ["--config", config, f"train.seed={seed}", f"run.dir={run_dir}",
                                                         *overrides])]
    run_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    t0 = time.time()
    run_logged(cmd, run_dir, threads, results, f"{config} seed {seed}")
    wall = time.time() - t0
    info = {"config": config, "seed": seed, "wall_s": wall, "resumed": resume, "threads": threads,
            "load_start": load_start, "load_end": os.getloadavg()[0], "command": shlex.join(cmd)}
    info_path.write_text(json.dumps(info, indent=1))
    return {**info, "results": json.loads(results.read_text()), "reused": False}


LABEL_KEYS = ("cam.high_thresh", "cam.low_thresh", "cam.par_dilations", "cam.par_num_iter", "quirks.round_denorm")


def label_settings(cfg) -> dict[str, object]:
    """The settings besides the CAMs that a run's ``pseudo`` labels are made with (the default pseudo labeller's)."""
    out = {}
    for key in LABEL_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def settings_text(changes: dict[str, object]) -> str:
    """"cam.high_thresh 0.2, cam.low_thresh 0.1": labelling settings as the output names them."""
    return ", ".join(f"{k} {v}" for k, v in changes.items())


def baseline_pseudo(run_dir: Path, config: str, changes: dict[str, object], threads: int) -> float:
    """The pseudo-label mIoU (%) of the baseline run in ``run_dir`` with its CAMs labelled by ``config``'s settings
    (``changes``: key -> value), by ``python -m fastwsss.evaluate --modes pseudo`` on its checkpoint, on the images its
    own final evaluation scored. Cached in ``<run_dir>/pseudo_as_<config>.json`` with the settings it was made with
    (a retrained baseline's directory is made afresh, so the cache goes with it)."""
    cache = run_dir / f"pseudo_as_{config}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["settings"] == changes:
            return saved["pseudo_miou"]
    scored = run_dir / f"pseudo_as_{config}.eval.json"
    max_images = load_config(run_dir / "config.yaml").eval.max_images
    cmd = [sys.executable, "-m", "fastwsss.evaluate", "--checkpoint", str(run_dir), "--modes", "pseudo",
           "--max-images", str(max_images), "--json", str(scored), *(f"{k}={json.dumps(v)}" for k, v in changes.items())]
    run_logged(cmd, run_dir, threads, scored, shlex.join(cmd))
    value = 100 * json.loads(scored.read_text())["pseudo"]["miou"]
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": changes, "pseudo_miou": value, "command": shlex.join(cmd)}, indent=1))
    tmp.replace(cache)
    return value


def fmt(v: float | None, digits: int = 1, sign: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def mmss(seconds: float) -> str:
    """"14:00" for 839.6 s: rounded to the second first (never "13:60")."""
    s = round(seconds)
    return f"{s // 60}:{s % 60:02d}"


def baseline_of(configs: list[str], methods: dict[str, str]) -> tuple[str | None, list[str]]:
    """(the baseline: the first config whose method trains no segmentation, or None; the other configs)."""
    baselines = [c for c in configs if not METHODS[methods[c]].trains_segmentation]
    return (baselines[0] if baselines else None), [c for c in configs if c not in baselines]


def miou(runs: dict[tuple[str, int], dict], config: str, seed: int, mode: str) -> float | None:
    v = runs[(config, seed)]["results"].get(f"{mode}_miou")
    return None if v is None else 100 * v


def column(config: str, mode: str) -> str:
    """A table column's name: the config and what of it is scored ("demo seg", "demo_cam CAM")."""
    return f"{config} {'CAM' if mode == 'cam' else mode}"


def seed_table(head: list[str], rows: list[list[float | None]], seeds: list[int], signed: int = 0) -> list[str]:
    """Markdown: one row per seed, then their mean in bold; the last ``signed`` columns (margins) with their sign."""
    mean = [statistics.mean(v for v in col if v is not None) if any(v is not None for v in col) else None
            for col in zip(*rows)]
    lines = ["| seed | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for s, row in zip(seeds, rows):
        lines.append(f"| {s} | " + " | ".join(fmt(v, sign=i >= len(row) - signed) for i, v in enumerate(row)) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{fmt(v, sign=i >= len(mean) - signed)}**"
                                             for i, v in enumerate(mean)) + " |")
    return lines


def relabelled_column(base: str, config: str) -> str:
    return f"{base} pseudo as {config}'s"


def tables(runs: dict[tuple[str, int], dict], configs: list[str], seeds: list[int], methods: dict[str, str],
           relabelled: dict[str, dict]) -> str:
    """The results table (one row per seed and the mean) and the timing table, in markdown. ``relabelled``: method
    config -> {"changes": its labelling settings that differ from the baseline's, "pseudo": {seed: the baseline's
    pseudo-label mIoU made with them}}; those configs' pseudo labels are compared with these."""
    base, others = baseline_of(configs, methods)

    def base_pseudo(c: str, s: int) -> float | None:
        return relabelled[c]["pseudo"][s] if c in relabelled else miou(runs, base, s, "pseudo")

    def difference(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    # per method config and seed: its seg and seg-crf - the baseline's CAM, its pseudo - the baseline's pseudo
    margins = {c: {s: (difference(miou(runs, c, s, "seg"), miou(runs, base, s, "cam")),
                       difference(miou(runs, c, s, "seg-crf"), miou(runs, base, s, "cam")),
                       difference(miou(runs, c, s, "pseudo"), base_pseudo(c, s))) for s in seeds}
               for c in others} if base else {}
    shown = ([(c, m) for c in others for m in ("seg", "seg-crf", "cam", "pseudo")]
             + [(base, m) for m in ("cam", "pseudo") if base])
    head = [column(c, m) for c, m in shown] + [relabelled_column(base, c) for c in relabelled] + ["all-bg",
                                                                                                   "likely-cls"]
    if base:
        for c in others:
            versus = relabelled_column(base, c) if c in relabelled else f"{base} pseudo"
            head += [f"{c} seg − {base} CAM", f"{c} seg-crf − {base} CAM", f"{c} pseudo − {versus}"]
    rows = [[miou(runs, c, s, m) for c, m in shown] + [base_pseudo(c, s) for c in relabelled]
            + [miou(runs, configs[0], s, "all-bg"), miou(runs, configs[0], s, "likely-cls")]
            + [v for c in others for v in margins[c][s]] for s in seeds]
    lines = seed_table(head, rows, seeds, signed=3 * len(margins))
    for c, by_seed in margins.items():
        worst = [min((m[i] for m in by_seed.values() if m[i] is not None), default=None) for i in (0, 1)]
        if worst[0] is not None:
            wins = sum(p is not None and p > 0 for *_, p in by_seed.values())
            crf = f" (seg-crf − {base} CAM {worst[1]:+.1f})" if worst[1] is not None else ""
            made = (f" (its CAMs labelled with {settings_text(relabelled[c]['changes'])} as {c}'s are)"
                    if c in relabelled else "")
            lines.append(f"\n{c}: smallest margin seg − {base} CAM over the seeds {worst[0]:+.1f}{crf}; pseudo labels "
                         f"above {base}'s{made} for {wins} of {len(seeds)} seeds.")
    n_images = {runs[k]["results"].get("num_images") for k in runs}
    lines.append(f"\nmIoU % on {'/'.join(map(str, sorted(n_images)))} val images; seg = the segmentation head, "
                 "single scale, no labels at test time; seg-crf = the same head by the papers' test protocol "
                 "(infer.*: multi-scale + flip, then the dense CRF; eval.final_infer), no labels either; CAM and "
                 "pseudo use the ground-truth image labels.")

    speed = [("\n| config | seed | wall | it/s first phase | it/s last phase (every term) | threads | "
              "load avg start / end | |"), "|---|---|---|---|---|---|---|---|"]
    for c in configs:
        for s in seeds:
            r = runs[(c, s)]
            rates = list(r["results"].get("it_per_s", {}).values())  # the phases in the order they came
            first, last = (rates[0], rates[-1] if len(rates) > 1 else None) if rates else (None, None)
            note = "resumed" if r.get("resumed") else ""
            speed.append(f"| {c} | {s} | {mmss(r['wall_s'])} | {fmt(first, 2)} | {fmt(last, 2)}"
                         f" | {r['threads']} | {r['load_start']:.2f} / "
                         f"{r['load_end']:.2f} | {note} |")
    return "\n".join(lines + speed)


def summary(runs: dict[tuple[str, int], dict], configs: list[str], seeds: list[int], methods: dict[str, str],
            relabelled: dict[str, dict]) -> str:
    """The short table for a README: each method's segmentation beside the baseline's CAM, then the pseudo labels
    (the baseline's also as each ``relabelled`` config labels them, see ``tables``)."""
    base, others = baseline_of(configs, methods)
    shown = ([(c, m) for m in ("seg", "seg-crf") for c in others] + [(base, "cam")] * bool(base)
             + [(c, "pseudo") for c in others] + [(base, "pseudo")] * bool(base))
    head = [column(c, m) for c, m in shown] + [relabelled_column(base, c) for c in relabelled]
    rows = [[miou(runs, c, s, m) for c, m in shown] + [relabelled[c]["pseudo"][s] for c in relabelled]
            for s in seeds]
    return "\n".join(seed_table(head, rows, seeds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-4", help="'0-4', '0,3,7', '0-2,5' or one seed (default 0-4)")
    parser.add_argument("--configs", nargs="+", default=["demo", "demo_cam"],
                        help="configs to run (default: demo demo_cam); the first whose method trains no segmentation "
                             "(train.method=cam) is the baseline")
    parser.add_argument("--toco", action="store_true", help="also run demo_toco")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--runs-dir", default="runs/demo_seeds", help="where the runs go (default runs/demo_seeds)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already have results")
    parser.add_argument("--out", help="also write the tables (markdown) to this file")
    parser.add_argument("--docs", help="also put them in this page after its '<!-- demo-seeds-table -->' line, in "
                                       "place of what followed it up to the next '<!-- /demo-seeds-table -->'")
    parser.add_argument("--readme", help="also put the short table (segmentation against the baseline's CAM, pseudo "
                                         "labels against the baseline's) in this page, between its "
                                         "'<!-- demo-seeds-summary -->' markers")
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. eval.max_images=100")
    args = parser.parse_args(argv)
    configs = args.configs + (["demo_toco"] if args.toco and "demo_toco" not in args.configs else [])
    seeds = parse_seeds(args.seeds)
    bad = [o for o in args.overrides if "=" not in o or o.split("=", 1)[0] in ("train.seed", "run.dir")]
    if bad:
        parser.error(f"overrides must be key=value and not train.seed / run.dir (set per run): {' '.join(bad)}")

    methods, labelling = {}, {}
    for c in configs:  # check every config first; generate the data once, before runs share it
        cfg = load_config(c, args.overrides)
        methods[c], labelling[c] = cfg.train.method, label_settings(cfg)
        open_splits(cfg.data)
    jobs = [(c, s) for s in seeds for c in configs]
    root = Path(args.runs_dir)
    t0 = time.time()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {job: pool.submit(run_one, job[0], job[1], root / job[0] / f"seed{job[1]}", args.overrides,
                                    args.threads, args.fresh) for job in jobs}
        runs = {}
        for job, future in futures.items():
            runs[job] = future.result()
            r = runs[job]
            print(f"{job[0]} seed {job[1]}: {'reused' if r['reused'] else mmss(r['wall_s'])}; "
                  + ", ".join(f"{k[:-5]} {100 * v:.1f}" for k, v in r["results"].items() if k.endswith("_miou")),
                  flush=True)
    base, others = baseline_of(configs, methods)
    relabelled = {}  # method config -> its labelling settings that differ from the baseline's, the baseline so labelled
    for c in (others if base else []):
        changes = {k: v for k, v in labelling[c].items() if v != labelling[base][k]}
        if changes:
            relabelled[c] = {"changes": changes, "pseudo": {
                s: baseline_pseudo(root / base / f"seed{s}", c, changes, args.threads) for s in seeds}}
            print(f"{base} pseudo labels as {c} makes them ({settings_text(changes)}): "
                  + ", ".join(f"seed {s} {v:.1f}" for s, v in relabelled[c]["pseudo"].items()), flush=True)
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], "benchmarks/demo_seeds.py", *(argv or sys.argv[1:])])
    reused = sum(r["reused"] for r in runs.values())
    made_by = (f"`{command}` ({len(jobs)} runs, {args.jobs} at a time, {args.threads} thread(s) each; "
               f"{mmss(time.time() - t0)} in all" + (f"; {reused} reused from earlier calls, with the threads the "
                                                      "timing table gives" if reused else "") + ")")
    text = made_by + "\n\n" + tables(runs, configs, seeds, methods, relabelled)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.docs:
        write_into_page(Path(args.docs), text)
    if args.readme:
        write_into_page(Path(args.readme), made_by + "\n\n" + summary(runs, configs, seeds, methods, relabelled),
                        "demo-seeds-summary")


def write_into_page(page: Path, text: str, marker: str = "demo-seeds-table") -> None:
    """Replace what stands between the page's ``<!-- marker -->`` lines with ``text``: its tables, then the line
    "Made by" its first paragraph (the command); the markers stay."""
    start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    content = page.read_text()
    if content.count(start) != 1 or content.count(end) != 1 or content.index(start) > content.index(end):
        raise SystemExit(f"{page}: needs one '{start.strip()}' line followed by one '{end}' line")
    head, rest = content.split(start)
    made_by, tables_text = text.split("\n\n", 1)  # the table first (the page shows the command above it)
    page.write_text(head + start + tables_text + "\n\nMade by " + made_by + ".\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
