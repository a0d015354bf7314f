"""What a run writes while it trains: the authors'-format log line, console logging above the progress bar, and
the optional TensorBoard writer."""

from __future__ import annotations

import datetime
import logging
import math
import sys
from pathlib import Path

from tqdm import tqdm

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
