"""Where and in what precision things run: the device, the autocast context of ``train.precision``, the fp32 islands
inside it, and the processes of a torchrun job. Training and the commands call these; nothing reads a config."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; an explicit ``cuda`` without CUDA, a CUDA index this machine does
    not have, or a device torch does not know is a ConfigError naming ``train.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"train.device={name} but CUDA is not available ({why}): use train.device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. ``auto``: bf16 on CUDA where supported, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_autocast(precision: str, device: torch.device) -> Callable[[], object]:
    """A factory of the autocast context for ``precision`` on ``device`` (a no-op context for fp32)."""
    amp = autocast_dtype(precision, device)
    return (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext


@contextmanager
def fp32_arithmetic() -> Iterator[None]:
    """Autocast off (CPU and CUDA), as a context or a decorator: inside, fp32 inputs are computed in fp32 even when
    the caller runs under autocast. Everything cut by a CAM threshold or fed to PAR runs in it, as the authors' fp32
    runs did: a bf16 CAM moves pixels across the 0.25 / 0.5 / 0.7 cuts (docs/precision.md)."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


# ---- many processes: torchrun + torch.distributed (NCCL on GPUs, gloo on CPUs)


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world_size`` (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes logs, metrics, checkpoints and summaries."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


ONE_PROCESS = Dist()  # the default: no torchrun


def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1; NCCL when CUDA is used, gloo otherwise) and
    pick this process's device (``cuda:LOCAL_RANK``); a single process gets ``Dist()`` and ``resolve_device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ONE_PROCESS, resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local), device


def shutdown_distributed() -> None:
    """Leave the process group at the end of a command (nothing to do without torchrun)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum over every process (in place; a no-op for one process)."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` on every process."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, d: Dist) -> list:
    """Every process's ``obj``, in rank order."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shard(n: int, d: Dist) -> range:
    """This process's contiguous share of ``n`` items (rank 0 gets the first ones)."""
    return range(n * d.rank // d.world_size, n * (d.rank + 1) // d.world_size)
