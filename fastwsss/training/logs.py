"""What a run writes while it trains: the loss terms' means over a log interval (``TermMeter``), and where they go
(``RunLog``): the authors'-format log line, console logging above the progress bar, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..files import atomic_write
from ..runtime import Dist, all_reduce_sum

log = logging.getLogger("fastwsss")


def log_line(step: int, elapsed_s: float, eta_s: float, lr: float, terms: dict[str, tuple[float, float, float]]
             ) -> str:
    """The authors' log line, each term beside its weighted value and the total: ``Iter: 100; Elasped: 0:01:23;
    ETA: 0:20:00; LR: 5.999e-05; cls_loss: 0.1234 (x1 = 0.1234), ptc_loss: 0.5000 (x0.2 = 0.1000); loss: 0.2234``.
    ``terms``: log name -> (unweighted, weight, weighted). "Elasped" is the authors' spelling, kept so that one parser
    (``fastwsss.plot``) reads both logs."""
    def hms(s: float) -> str:
        return str(datetime.timedelta(seconds=int(s)))

    def num(v: float) -> str:  # the authors' %.4f, but small terms (the reg loss, ~1e-5) keep their digits
        return f"{v:.4f}" if v == 0 or abs(v) >= 1e-2 or not math.isfinite(v) else f"{v:.3e}"

    parts = ", ".join(f"{name}: {num(v)} (x{w:g} = {num(wv)})" for name, (v, w, wv) in terms.items())
    total = sum(wv for _, _, wv in terms.values())
    return f"Iter: {step}; Elasped: {hms(elapsed_s)}; ETA: {hms(eta_s)}; LR: {lr:.3e}; {parts}; loss: {num(total)}"


def open_tensorboard(log_dir: Path):
    """A torch.utils.tensorboard SummaryWriter, or an error that says how to install it (``run.tensorboard``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(f"run.tensorboard=true needs the tensorboard package ({err}): pip install "
                          "'fastwsss[tensorboard]', or set run.tensorboard=false") from None
    return SummaryWriter(log_dir=str(log_dir))


class _TqdmHandler(logging.StreamHandler):
    """Console log lines above the progress bar instead of through it."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except (OSError, ValueError):  # as StreamHandler: report, never raise
            self.handleError(record)


def setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in list(log.handlers):
        log.removeHandler(h)
    for h in (_TqdmHandler(), logging.FileHandler(run_dir / "train.log")):
        h.setFormatter(fmt)
        log.addHandler(h)


def setup_worker_logging(rank: int) -> None:
    """The other processes of a torchrun job write nothing to the run directory: their warnings and errors go to the
    console, marked with their rank."""
    log.setLevel(logging.WARNING)
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)


class TermMeter:
    """Each loss term's [unweighted, weighted] value summed over the steps of a log interval, on the device (no host
    sync until :meth:`means`)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}  # steps of the interval that computed the term
        self.weights: dict[str, float] = {}

    def add(self, sums: dict[str, torch.Tensor], weights: dict[str, float]) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.steps[k] = self.steps.get(k, 0) + 1
        self.weights.update(weights)

    def means(self, log_names: dict[str, str], dist: Dist) -> dict[str, tuple[float, float, float]]:
        """Log name -> (unweighted, weight, weighted), each the mean over the steps that computed it, summed over the
        processes (every process must call this: one all-reduce and one host sync), in the authors' order; then
        starts a new interval."""
        totals = all_reduce_sum(torch.stack(list(self.sums.values())), dist).tolist() if self.sums else []
        means = dict(zip(self.sums, totals))
        out = {name: (means[k][0] / self.steps[k], self.weights[k], means[k][1] / self.steps[k])
               for k, name in log_names.items() if k in means}
        self.sums, self.steps = {}, {}
        return out


class PhaseSpeed:
    """Training iterations per second for each phase of a run (a phase: the set of loss terms that are on), over the
    log intervals after the first (start-up) and without the time spent checkpointing and evaluating; a slow machine
    shows as every phase slow, slow code as one phase."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}  # phase -> [steps, seconds]

    def add(self, terms, steps: int, seconds: float) -> None:
        total = self.totals.setdefault(" + ".join(terms), [0, 0.0])
        total[0] += steps
        total[1] += seconds

    def rates(self) -> dict[str, float]:
        """Phase ("cls_loss + cls_loss_aux", the authors' term names) -> it/s, in the order the phases came."""
        return {phase: steps / seconds for phase, (steps, seconds) in self.totals.items() if seconds > 0}


class RunLog:
    """Where a run's numbers go: ``metrics.jsonl``, the log (console and ``train.log``), the progress bar and
    TensorBoard. Off the first process of a torchrun job it does nothing (the numbers it gets are every process's)."""

    def __init__(self, run_dir: Path, *, name: str, max_iters: int, start: int, tensorboard: bool, main: bool):
        """``start``: the step the run (re)starts at; ``metrics.jsonl`` lines of later steps (written after the last
        checkpoint by a run that died) are dropped, so each step is in the file once."""
        self.main = main
        self.metrics = self.tensorboard = None
        self.bar = tqdm(total=max_iters, initial=start, desc=name, dynamic_ncols=True, mininterval=2.0,
                        disable=not main)
        if not main:
            return
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= start]
            atomic_write(path, lambda p: p.write_text("".join(kept)))
        self.metrics = open(path, "a")  # noqa: SIM115 (closed by close())
        self.tensorboard = open_tensorboard(run_dir / "tensorboard") if tensorboard else None

    def step(self) -> None:
        self.bar.update(1)

    def interval(self, record: dict, line: str, logged: dict[str, tuple[float, float, float]]) -> None:
        """One log interval: its metrics record, the authors'-format log line and the terms for the bar and TB."""
        if not self.main:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        log.info(line)
        self.bar.set_postfix({name: f"{v:.4f}" for name, (v, _, _) in logged.items()} | {"lr": f"{record['lr']:.2e}"})
        if self.tensorboard is not None:
            for name, (v, _, wv) in logged.items():
                self.tensorboard.add_scalar(f"loss/{name}", v, record["step"])
                self.tensorboard.add_scalar(f"loss_weighted/{name}", wv, record["step"])
            for key in ("loss", "lr", "it_per_s"):
                if key in record:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], record["step"])
            self.tensorboard.flush()

    def evaluation(self, result: dict) -> None:
        if not self.main:
            return
        self.metrics.write(json.dumps({"eval": result}) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in result.items():
                if key.endswith("_miou"):
                    self.tensorboard.add_scalar(f"eval/{key}", value, result["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _step_of(line: str) -> float:
    """The step a metrics.jsonl line is about (an interval's or an evaluation's); inf for a line torn by a crash."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    return record["eval"]["step"] if "eval" in record else record.get("step", math.inf)
