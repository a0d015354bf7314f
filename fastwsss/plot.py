"""Training curves: ``python -m fastwsss.plot RUN_DIR [--official FILE] [--out curves.png]``.

Draws a run's curves from its ``metrics.jsonl`` — each loss term (unweighted, under the authors' log names), the
learning rate and the evaluations' mIoU — to a PNG, optionally beside an official training log (or any log with
``Iter: N; ...; LR: x; name: value, ...`` lines, such as a fastwsss ``train.log``). Needs matplotlib
(``pip install 'fastwsss[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from omegaconf import OmegaConf

from .cli import user_errors
from .methods import METHODS

Series = dict[str, tuple[list[float], list[float]]]  # name -> (iterations, values)

_PAIR = re.compile(r"([A-Za-z_][\w-]*): ([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))(?=[\s,;().]|$)")
_NOT_SERIES = {"Iter", "Elasped", "Elapsed", "ETA"}
_EVAL_MODES = ("seg", "cam", "aux-cam", "pseudo", "lam")  # the evaluations' mIoU drawn (not the trivial baselines)


def _add(series: Series, name: str, step: float, value: float) -> None:
    steps, values = series.setdefault(name, ([], []))
    steps.append(step)
    values.append(value)


def parse_log(path: str | Path) -> Series:
    """A training log -> series from its ``Iter: N; ...`` lines: ``LR`` and every ``name: value`` pair after it
    (``Elasped`` / ``ETA`` are times, not series). Other lines are ignored."""
    series: Series = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        m = re.search(r"Iter: (\d+)", line)
        if m is None:
            continue
        step = int(m.group(1))
        for name, value in _PAIR.findall(line[m.end():]):
            if name not in _NOT_SERIES:
                _add(series, name, step, float(value))
    return series


def run_series(run: str | Path) -> tuple[Series, Series, list[str]]:
    """A run directory (or its metrics.jsonl) -> (training series: each term's unweighted value under the authors'
    names and ``LR``; evaluation series ``<mode>_miou`` in %; the run's term names in the authors' order)."""
    run = Path(run)
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    config = path.parent / "config.yaml"
    method = OmegaConf.load(config).train.method if config.is_file() else None
    names = list(METHODS[method].log_names.values()) if method in METHODS else []
    train: Series = {}
    evals: Series = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "eval" in record:
            ev = record["eval"]
            for mode in _EVAL_MODES:
                if f"{mode}_miou" in ev:
                    _add(evals, f"{mode}_miou", ev["step"], 100 * ev[f"{mode}_miou"])
        elif "step" in record:
            _add(train, "LR", record["step"], record["lr"])
            for key, value in record.items():
                if key in names or (not names and key.endswith(("_loss", "_loss_aux"))):
                    _add(train, key, record["step"], value)
    if not names:
        names = [k for k in train if k != "LR"]
    return train, evals, names


def plot_curves(run: str | Path, out: str | Path, official: str | Path | None = None) -> Path:
    """Draw the run's curves (and the official log's, dashed) to ``out``: one panel per loss term, then the learning
    rate, then the evaluations' mIoU. Returns ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"fastwsss.plot needs matplotlib ({err}): pip install 'fastwsss[plot]'") from None

    train, evals, names = run_series(run)
    theirs = parse_log(official) if official is not None else {}
    if official is not None and not theirs:
        raise ValueError(f"{official} has no 'Iter: N; ...; name: value' lines")
    losses = names + [k for k in theirs if k not in names and k != "LR"]
    panels = [*losses, "LR"] + (["mIoU"] if evals else [])
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if panel == "mIoU":
            for mode, (x, y) in evals.items():
                ax.plot(x, y, marker="o", label=mode.removesuffix("_miou"))
            ax.set_ylabel("mIoU %")
        else:
            for source, style, label in ((train, "-", "fastwsss"), (theirs, "--", "official")):
                if panel in source:
                    x, y = source[panel]
                    ax.plot(x, y, linestyle=style, marker="o" if len(x) == 1 else None, label=label)
            if panel == "LR":
                ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastwsss.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory (or its metrics.jsonl)")
    parser.add_argument("--official", help="an official training log to draw beside the run (dashed)")
    parser.add_argument("--out", help="PNG to write (default: <run dir>/curves.png)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    out = args.out or (run if run.is_dir() else run.parent) / "curves.png"
    try:
        path = plot_curves(run, out, args.official)
    except (ImportError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(path)


if __name__ == "__main__":
    main()
