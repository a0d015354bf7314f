"""Compile every Triton kernel of fastwsss for sm_90 (H100/H200) and sm_80 (A100) with the real Triton compiler.

No GPU is needed: Triton lowers to PTX and ptxas to a cubin on any machine. The check fails (exit 1) when a kernel
does not compile, needs more shared memory than its arch allows per block, spills registers (any specialization,
default path or API only), or lowers a half-precision dot to anything but wgmma on sm_90 / mma on sm_80. It prints
one line per (specialization, target) and writes ``results.json`` / ``results.md``.

    python benchmarks/compile_check.py [--quick] [--targets 90,80] [--jobs N] [--out-dir DIR]

How the specializations are found (never from a hand-kept list): a child process runs the project's own callers
(the MCC attention routes, the affinity loss, the PAR of the training and inference pseudo labels, the lattice of
the regularisation loss and of the dense CRF) at production shapes on CPU tensors, under the Triton interpreter,
with the kernel modules loaded as a CUDA machine loads them (``_backend.INTERPRET`` False: GPU block sizes and
options). Every ``kernel[grid](...)`` launch is recorded -- argument dtypes, pointer alignment, ints, constexprs,
options, grid -- and keyed with Triton's own specialization rule (ints % 16, ints == 1, pointers % 16), then not
executed (except the lattice coordinate kernel, whose output drives the host-side lattice build). Ints whose value
depends on the data (packed lengths, lattice sizes) are compiled a second time with the opposite divisibility.
This process then compiles each one through ``JITFunction.warmup`` with a stand-in driver whose target is the GPU
architecture: Triton's binder, options and pipeline down to ptxas, exactly what a launch would compile.

Both attention APIs are compiled at every head dim they accept (``API_HEAD_DIMS``), in every dtype, in both modes.
``--quick`` leaves out the other API-only cases no config launches (plain cosine affinity, the lattice filter's
fp16 / bf16 values); CI (``tests/test_compile_check.py``) runs the default mode, everything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# kernels that must really run during the capture (their outputs drive host logic), and the block they run with
EXECUTE = {"lattice_coords_kernel": ("BLOCK", "P", 4096)}
# int arguments whose value depends on the data, not only on the shapes: compiled with both divisibilities
DATA_DEPENDENT = {
    "varlen_attention_fwd_kernel": ("T",),
    "varlen_attention_bwd_dkdv_kernel": ("T",),
    "varlen_attention_bwd_kernel": ("T",),
    "lattice_splat_kernel": ("R",),
    "lattice_blur_kernel": ("M",),
}
# head dims of the attention API cases: every specialization a head dim D in 1..256 makes. The API pads D to a
# multiple of 16 (so D and every row stride are divisible by 16) and BLOCK_D = max(16, next_pow2(D)) picks the tiles
# (_configs): one specialization per BLOCK_D (16, 32, 64, 128, 256) and dtype. The ragged head dims here (1, 7, 23,
# 47, 97, 201) show that they land on the same ones (their launches deduplicate; capturing them costs seconds).
API_HEAD_DIMS = (1, 7, 16, 23, 32, 47, 64, 97, 128, 201, 256)
API_MASKS = (1, 3)  # masks per image of the masked API cases: M == 1 is a specialization of its own
# per-SM limits of the occupancy estimate and the per-block shared-memory budget
ARCH = {
    90: {"name": "sm_90 (H100/H200)", "sms": 132, "regs": 65536, "max_warps": 64, "max_blocks": 32,
         "smem_sm": 228 * 1024, "smem_block": 227 * 1024, "smem_reserved": 1024, "half_dot": "wgmma"},
    80: {"name": "sm_80 (A100)", "sms": 108, "regs": 65536, "max_warps": 64, "max_blocks": 32,
         "smem_sm": 164 * 1024, "smem_block": 163 * 1024, "smem_reserved": 1024, "half_dot": "mma.sync"},
}
HALF = {"f16", "bf16"}


# ================================================================================================= phase 1: capture

def _jsonable(v):
    import torch

    if isinstance(v, torch.Tensor):
        return {"t": "tensor", "dtype": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if isinstance(v, bool):
        return {"t": "bool", "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": v}
    if isinstance(v, float):
        return {"t": "float", "v": v}
    if isinstance(v, str):
        return {"t": "str", "v": v}
    if v is None:
        return {"t": "none"}
    raise TypeError(f"cannot record a launch argument of type {type(v)}")


class Recorder:
    """Intercepts interpreted launches; ``case(name, default)`` labels the launches that follow."""

    def __init__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self.records: list[dict] = []
        self.name, self.default = None, True
        self._cls, self._orig = InterpretedFunction, InterpretedFunction.run

    def case(self, name: str, default: bool) -> None:
        self.name, self.default = name, default
        print(f"[capture] {name}{'' if default else '  (API only)'}", flush=True)

    def __enter__(self):
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        orig, recorder = self._orig, self

        def run(self, *args, grid, warmup, **kwargs):
            fn = self.fn
            sig = inspect.signature(fn)
            options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
            bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
            bound.apply_defaults()
            rec_args = []
            for name, p in sig.parameters.items():
                v = bound.arguments[name]
                r = {"name": name, "constexpr": "constexpr" in str(p.annotation), **_jsonable(v)}
                if not r["constexpr"]:
                    ty, attr = native_specialize_impl(CUDABackend, v, False, True, True)
                    r["spec"] = [ty, attr if isinstance(attr, (str, type(None))) else repr(attr)]
                rec_args.append(r)
            g = tuple(int(x) for x in (grid if isinstance(grid, tuple) else (grid,)))
            recorder.records.append({
                "kernel": fn.__name__, "module": fn.__module__, "file": inspect.getsourcefile(fn),
                "first_line": fn.__code__.co_firstlineno, "args": rec_args,
                "options": {k: _jsonable(v)["v"] for k, v in options.items()}, "grid": list(g),
                "case": recorder.name, "default": recorder.default})
            if fn.__name__ in EXECUTE:  # really run it, with a larger block: same outputs, fewer programs
                block_arg, size_arg, block = EXECUTE[fn.__name__]
                bound.arguments[block_arg] = block
                n = bound.arguments[size_arg]
                return orig(self, *bound.args, grid=((n + block - 1) // block,), warmup=warmup, **options)
            return None

        self._cls.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._orig


def _test_image(h: int, w: int, seed: int):
    """A synthetic photograph (a lattice as large as a real image's) as [3, h, w] float32 0..255."""
    import torch

    from fastwsss.kernels.testing import natural_image

    return torch.from_numpy(natural_image(h, w, seed)).permute(2, 0, 1).float()


def run_cases(rec: Recorder, quick: bool) -> None:
    """The project's callers at production shapes (ViT-B/16 at 448, 8 MCC views, VOC CAMs, 224^2 PAR and lattice,
    a 500x375 CRF): every launch a GPU run of training or inference makes, in each dtype it can see."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fastwsss.inference.crf import CRFParams, dense_crf_torch
    from fastwsss.kernels import (
        PermutohedralLattice,
        bilateral_features,
        masked_key_attention,
        par_refine,
        token_affinity_loss,
        varlen_attention,
    )
    from fastwsss.kernels._backend import TRITON_DTYPES
    from fastwsss.kernels.attention import MaskedKeyAttention, masked_self_attention, packed_self_attention
    from fastwsss.methods.losses import reg_loss
    from fastwsss.methods.mcc import random_key_masks
    from fastwsss.pseudo import refine_seg_label

    dtypes = TRITON_DTYPES
    g = torch.Generator().manual_seed(0)

    # attention: MCC's local views, ViT-B/16 at 448 (N = 785), 8 masks per image, batch 4
    class Tile3(nn.Module):  # stands in for the qkv Linear: a contiguous [..., 3C] output, differentiable
        def forward(self, x):
            return x.repeat(*([1] * (x.ndim - 1)), 3)

    B, M, H, G, Dh = 4, 8, 12, 28, 64
    C, N = H * Dh, 1 + G * G
    patches = torch.from_numpy(random_key_masks(np.random.default_rng(0), B * M, (G, G))).reshape(B, M, G * G)
    keep = torch.cat([torch.ones(B, M, 1, dtype=torch.bool), patches], dim=2)  # the class token is always visible
    counts = keep.sum(-1).flatten()
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    T = int(counts.sum())
    for dt in dtypes:
        default = True  # bf16 autocast on a GPU by default; fp32 with train.precision=fp32, fp16 with fp16
        attn = MaskedKeyAttention(C, num_heads=H, qkv_bias=True, dtype=dt)
        attn.qkv, attn.proj = Tile3(), nn.Identity()
        rec.case(f"attention, MCC masked route, first block: B={B} M={M} H={H} N={N} D={Dh} {dt}", default)
        x = torch.randn(B, N, C, dtype=dt, generator=g).requires_grad_()
        masked_self_attention(attn, x, keep, "triton").sum().backward()
        rec.case(f"attention, MCC masked route, later blocks: {B * M} views M=1 H={H} N={N} D={Dh} {dt}", default)
        x = torch.randn(B * M, N, C, dtype=dt, generator=g).requires_grad_()
        masked_self_attention(attn, x, keep.reshape(B * M, 1, N), "triton").sum().backward()
        rec.case(f"attention, MCC token-dropped route (varlen): {B * M} views T={T} H={H} D={Dh} {dt}", default)
        seq = torch.randn(T, C, dtype=dt, generator=g).requires_grad_()
        packed_self_attention(attn, seq, cu, "triton").sum().backward()
    # both attention APIs at every head dim they accept, in every dtype (--quick too); ragged head dims reach the
    # kernels padded to a multiple of 16, so they compile to the same specializations as the multiples of 16
    lengths = [1, 0, 39, 100, 3, 70]  # T = 213: not a multiple of 16 (the flipped variant compiles T = 224)
    cu_api = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    for dh in API_HEAD_DIMS:
        for dt in dtypes:
            for m_api in API_MASKS:
                rec.case(f"masked_key_attention, head dim {dh}: B=1 M={m_api} H=3 N=197 {dt}", False)
                q, k, v = (torch.randn(1, 3, 197, dh, dtype=dt, generator=g).requires_grad_() for _ in range(3))
                masked_key_attention(q, k, v, keep[:1, :m_api, :197], backend="triton").sum().backward()
            rec.case(f"varlen_attention, head dim {dh}: {len(lengths)} sequences T={sum(lengths)} H=3 {dt}", False)
            q, k, v = (torch.randn(sum(lengths), 3, dh, dtype=dt, generator=g).requires_grad_() for _ in range(3))
            varlen_attention(q, k, v, cu_api, backend="triton").sum().backward()

    # token affinity loss: the final feature map of ViT-B at 448, batch 4
    labels = torch.randint(0, 6, (4, 784), generator=g)
    labels[labels == 5] = 255
    for dt in dtypes:
        rec.case(f"token affinity loss fwd+bwd: B=4 N=784 D=768 {dt}", True)
        token_affinity_loss(torch.randn(4, 784, 768, generator=g).to(dt).requires_grad_(), labels,
                            backend="triton").backward()
    if not quick:
        rec.case("token affinity loss, plain cosine: B=4 N=784 D=768 torch.float32", False)
        token_affinity_loss(torch.randn(4, 784, 768, generator=g).requires_grad_(), labels, absolute=False,
                            backend="triton").backward()

    # PAR: the API over K, the training pseudo label (448 crop -> 224), the inference pseudo label (500x375 image)
    imgs = torch.rand(4, 3, 224, 224, generator=g)
    with torch.no_grad():
        for K in (2, 3, 8, 21, 42):
            for dt in dtypes:
                rec.case(f"PAR 224x224 B=4 K={K} {dt}", True)
                par_refine(imgs, torch.rand(4, K, 224, 224, generator=g).softmax(1).to(dt), backend="triton")
        cls_label = torch.zeros(4, 20)
        for i, present in enumerate(([3, 7], [14], [0, 5, 9], [11])):
            cls_label[i, present] = 1
        rec.case("PAR via refine_seg_label (training pseudo label: 448 crop -> 224, VOC classes) torch.float32", True)
        refine_seg_label(torch.rand(4, 20, 448, 448, generator=g), cls_label, torch.randn(4, 3, 448, 448, generator=g),
                         torch.tensor([[0, 448, 0, 448]] * 4), par_backend="triton")
        rec.case("PAR via refine_seg_label (inference pseudo label: one 500x375 image -> 250x187) torch.float32", True)
        refine_seg_label(torch.rand(1, 20, 375, 500, generator=g), cls_label[:1], torch.randn(1, 3, 375, 500),
                         None, par_backend="triton")

    # lattice: the regularisation loss (training) and the dense CRF (inference)
    rec.case("lattice via reg_loss (training, exact grad): 448 -> 224x224 B=4 C=21 torch.float32", True)
    seg_logits = torch.randn(4, 21, 448, 448, generator=g).requires_grad_()
    images = torch.stack([_test_image(448, 448, s) for s in range(4)])
    reg_loss(seg_logits, images, torch.tensor([[0, 448, 0, 448]] * 4), torch.randint(0, 21, (4, 448, 448), generator=g),
             exact_grad=True, backend="triton").backward()
    rec.case("lattice via dense_crf_torch (inference CRF): 500x375 B=1 C=21, Gaussian + bilateral torch.float32", True)
    probs = torch.rand(1, 21, 375, 500, generator=g).softmax(1)
    dense_crf_torch(_test_image(375, 500, 7)[None].to(torch.uint8), probs, CRFParams(iterations=1), backend="triton")
    if not quick:
        lat = PermutohedralLattice(bilateral_features(torch.stack([_test_image(224, 224, s) for s in range(4)]),
                                                      15.0, 50.0), backend="triton")
        for dt in (torch.float16, torch.bfloat16):
            rec.case(f"lattice filter, values {dt}: 224x224 B=4 C=21", False)
            lat.filter(torch.rand(4, 21, 224, 224, generator=g).to(dt))


def capture(path: Path, quick: bool) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the capture runs under the Triton interpreter"
    import fastwsss.kernels._backend as kb

    kb.INTERPRET = False  # load the kernel modules as a CUDA machine does: GPU blocks, num_warps, no UPCAST
    for op in ("attention", "affinity", "par", "lattice"):
        name = f"fastwsss.kernels.{op}._triton"
        mod = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
        assert mod.INTERPRET is False, f"{name} still sees INTERPRET=True"
    kb.INTERPRET = True  # ... while dispatch still accepts CPU tensors
    with Recorder() as rec:
        run_cases(rec, quick)
    path.write_text(json.dumps(rec.records))
    print(f"[capture] {len(rec.records)} launches recorded", flush=True)


# ================================================================================================= phase 2: compile

def _spec_key(rec: dict) -> str:
    parts = []
    for a in rec["args"]:
        if a["constexpr"]:
            parts.append(f"{a['name']}={a.get('v')}")
        elif a["spec"][0] == "constexpr":
            parts.append(f"{a['name']}=={a['v']}")
        else:
            parts.append(f"{a['name']}:{a['spec'][0]}{':' + a['spec'][1] if a['spec'][1] else ''}")
    opts = ",".join(f"{k}={v}" for k, v in sorted(rec["options"].items()))
    return f"{rec['module']}.{rec['kernel']}({'; '.join(parts)})[{opts}]"


def short_spec(spec: dict) -> str:
    """Constexprs, pointer dtypes, ints specialised (==1 or %16), unaligned pointers, launch options."""
    ce = [f"{a['name']}={a['v']}" for a in spec["args"] if a["constexpr"]]
    ptrs = Counter(a["spec"][0][1:] for a in spec["args"] if not a["constexpr"] and a["spec"][0].startswith("*"))
    one = [a["name"] for a in spec["args"] if not a["constexpr"] and a["spec"][0] == "constexpr"]
    div = [a["name"] for a in spec["args"] if not a["constexpr"] and a["t"] == "int" and a["spec"][1] == "D"]
    unaligned = [a["name"] for a in spec["args"] if a["t"] == "tensor" and not a["aligned"]]
    s = " ".join(ce) + " ptr{" + ",".join(f"{k}x{v}" for k, v in sorted(ptrs.items())) + "}"
    for label, names in (("==1", one), ("%16", div), ("unaligned", unaligned)):
        if names:
            s += f" {label}{{{','.join(names)}}}"
    return s + "".join(f" {k}={v}" for k, v in spec["options"].items())


def unique_specs(records: list[dict]) -> list[dict]:
    """One entry per specialization, with every case and grid that launched it, plus the data-dependent flips."""
    specs: dict[str, dict] = {}
    for r in records:
        s = specs.setdefault(_spec_key(r), {**r, "key": _spec_key(r), "cases": [], "grids": [], "default": False,
                                            "variant": "captured"})
        s["default"] |= r["default"]
        if r["case"] not in s["cases"]:
            s["cases"].append(r["case"])
        if r["grid"] not in s["grids"]:
            s["grids"].append(r["grid"])
    for s in list(specs.values()):
        names = DATA_DEPENDENT.get(s["kernel"], ())
        args, changed = [dict(a) for a in s["args"]], []
        for a in args:
            if a["name"] in names and a["t"] == "int":
                v = a["v"]
                a["v"] = v + 1 if v % 16 == 0 else (v + 15) // 16 * 16
                a["spec"] = [a["spec"][0], "D" if a["v"] % 16 == 0 else ""]
                changed.append(f"{a['name']}={v}->{a['v']}")
        if changed:
            flip = {**s, "args": args, "variant": "flipped " + ",".join(changed), "cases": s["cases"][:1]}
            flip["key"] = _spec_key(flip)
            specs.setdefault(flip["key"], flip)
    return list(specs.values())


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_DOT_RE = re.compile(r"=\s+(tt\.dot|ttng\.warp_group_dot|tt\.dot_scaled)\s+(.*)$")
_TY_RE = re.compile(r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+)")
_SHORT_TY = {"f32": "f32", "f16": "f16", "bf16": "bf16", "tf32": "tf32"}


def parse_dots(ttgir: str) -> list[dict]:
    """Each dot of the TTGIR: how it was lowered (wgmma / mma.sync / fma), operand and accumulator types, MxNxK."""
    aliases = dict(re.findall(r"^(#\w+) = (#[\w.]+<.*?)$", ttgir, flags=re.MULTILINE))
    dots = []
    for line in ttgir.splitlines():
        m = _DOT_RE.search(line)
        if not m:
            continue
        op, rest = m.groups()
        tys = _TY_RE.findall(rest)
        res = re.search(r"->\s*tensor<[\dx]+x\w+,\s*(#\w+)", rest)
        enc = aliases.get(res.group(1), "") if res else ""
        if op == "ttng.warp_group_dot" or "versionMajor = 3" in enc:
            kind = "wgmma"
        elif "nvidia_mma" in enc:
            kind = "mma.sync"
        elif "blocked" in enc:
            kind = "fma"
        else:
            kind = "?"
        a = tys[0] if tys else ("?", "?", "?")
        c = tys[-1] if len(tys) > 2 else ("?", "?", "?")
        dots.append({"kind": kind, "in": a[2], "acc": c[2], "mnk": f"{c[0]}x{c[1]}x{a[1]}"})
    return dots


def _run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return p.stdout + p.stderr


def ptxas_info(ptx: str, cap: int, fp_fusion: bool) -> dict:
    """ptxas -v with Triton's own flags: registers, stack frame and spill bytes."""
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    flags = ["-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}"]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = _run([_tool("ptxas"), *flags, str(src), "-o", str(Path(d) / "k.cubin")])
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spill bytes from the output of ptxas -v ({} when it has none)."""
    info = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        info["stack"], info["spill_st"], info["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", log)
    if m:
        info["regs"] = int(m.group(1))
    return info


def occupancy(cap: int, regs: int, warps: int, shared: int) -> dict:
    a = ARCH[cap]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = {"regs": (a["regs"] // regs_per_warp) // warps, "warps": a["max_warps"] // warps,
              "smem": a["smem_sm"] // (shared + a["smem_reserved"]) if shared else a["max_blocks"],
              "blocks": a["max_blocks"]}
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / a["max_warps"], "limiter": limiter}


class _StandInDriver:
    """Just enough of an active Triton driver for ``JITFunction.warmup`` to compile for a chosen target."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # a JIT cache per target

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def compile_one(spec: dict, cap: int) -> dict:
    """Compile one specialization for sm_<cap>; the row of the report (``ok`` False with the error on failure)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import MockTensor

    assert os.environ.get("TRITON_INTERPRET") != "1", "compile without TRITON_INTERPRET"

    class PointerArg(MockTensor):  # dtype and alignment are all the specialization sees of a tensor
        def __init__(self, dtype, aligned):
            super().__init__(dtype)
            self._ptr = 0 if aligned else 4

        def data_ptr(self):
            return self._ptr

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    args = [PointerArg(getattr(torch, a["dtype"]), a["aligned"]) if a["t"] == "tensor" else
            None if a["t"] == "none" else a["v"] for a in spec["args"]]
    row = {k: spec[k] for k in ("kernel", "key", "variant", "cases", "grids", "default", "file", "first_line")}
    row.update(target=cap, short=short_spec(spec), dtypes=sorted({
        d for c in spec["cases"] for d in re.findall(r"torch\.(float\d+|bfloat16)", c)}))
    driver.set_active(_StandInDriver(GPUTarget("cuda", cap, 32)))
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its own ptxas -v: no second ptxas run for the figures
    log = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):
            ck = kernel.warmup(*args, grid=(1,), **spec["options"])
    except Exception as e:  # noqa: BLE001 - every compiler error is a finding
        return {**row, "ok": False, "error": f"{type(e).__name__}: {e}"[:4000], "seconds": round(time.time() - t0, 1)}
    md = ck.metadata
    row.update(ok=True, seconds=round(time.time() - t0, 1), shared=md.shared, num_warps=md.num_warps,
               num_stages=md.num_stages, dots=parse_dots(ck.asm["ttgir"]))
    # a kernel from Triton's cache printed no log: run ptxas -v with Triton's flags ourselves
    row.update(parse_ptxas_log(log.getvalue()) or ptxas_info(ck.asm["ptx"], cap,
                                                              spec["options"].get("enable_fp_fusion", True)))
    row.update(occupancy(cap, row.get("regs", 0), md.num_warps, md.shared))
    slots = ARCH[cap]["sms"] * max(row["blocks_per_sm"], 1)
    row["waves"] = [round(_prod(g) / slots, 2) for g in spec["grids"]]
    return row


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def failures(row: dict) -> list[str]:
    """Why this compiled kernel fails the check ([] = it passes)."""
    if not row["ok"]:
        return ["does not compile"]
    a, out = ARCH[row["target"]], []
    if row["shared"] > a["smem_block"]:
        out.append(f"shared memory {row['shared']} B > {a['smem_block']} B per block")
    if row.get("spill_st", 0) or row.get("spill_ld", 0):
        where = "a default path" if row["default"] else "an API-only path"
        out.append(f"spills {row['spill_st']}/{row['spill_ld']} B (stores/loads) on {where}")
    bad = sorted({f"{d['in']}->{d['kind']}" for d in row["dots"] if d["in"] in HALF and d["kind"] != a["half_dot"]})
    if bad:
        out.append(f"half-precision dot not lowered to {a['half_dot']}: {', '.join(bad)}")
    return out


def notes(row: dict) -> list[str]:
    """What is worth a look without failing the check."""
    if not row["ok"]:
        return []
    out = []
    if any(d["kind"] == "fma" for d in row["dots"]):
        out.append("fp32 dots on FMAs (IEEE)")
    if row["waves"] and min(row["waves"]) < 1.0:
        out.append(f"grid {min(row['waves'])} waves")
    return out


def format_row(r: dict) -> str:
    status = "FAIL" if r["failures"] else "ok  "
    head = f"{status} sm_{r['target']} {r['kernel']:36s} {'/'.join(r['dtypes']) or '-':26s}"
    if not r["ok"]:
        return f"{head} {r['short']}\n     {r['error'][:1500]}"
    dots = ",".join(sorted({f"{d['kind']}:{d['in']}" for d in r["dots"]})) or "-"
    text = (f"{head} regs={r.get('regs', '?'):>3} spill={r.get('spill_st', '?')}/{r.get('spill_ld', '?')} "
            f"smem={r['shared']:>6} warps={r['num_warps']} occ={r['occupancy']:.2f} waves={r['waves'][0]} "
            f"dots={dots} | {r['short']}" + ("" if r["variant"] == "captured" else f" [{r['variant']}]"))
    return text + "".join(f"\n     FAIL: {f}" for f in r["failures"]) + (
        f"\n     note: {'; '.join(r['notes'])}" if r["notes"] else "")


def write_markdown(rows: list[dict], path: Path) -> None:
    header = ("| kernel | target | dtypes | path | regs | spill st/ld B | smem B | warps | occupancy (limiter) "
              "| dots | waves | result | specialization |")
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        path_kind = "default" if r["default"] else "API only"
        if not r["ok"]:
            lines.append(f"| {r['kernel']} | sm_{r['target']} | {','.join(r['dtypes'])} | {path_kind} | | | | | | | | "
                         f"**does not compile** | {r['short']} |")
            continue
        dots = "; ".join(sorted({f"{d['kind']} {d['in']}->{d['acc']}" for d in r["dots"]})) or "-"
        result = "**" + "; ".join(r["failures"]) + "**" if r["failures"] else "ok"
        lines.append(f"| {r['kernel']} | sm_{r['target']} | {','.join(r['dtypes'])} | {path_kind} | {r.get('regs')} | "
                     f"{r.get('spill_st')}/{r.get('spill_ld')} | {r['shared']} | {r['num_warps']} | "
                     f"{r['occupancy']:.2f} ({r['limiter']}) | {dots} | {' '.join(map(str, r['waves'][:3]))} | "
                     f"{result} | {r['short']}{'' if r['variant'] == 'captured' else ' [' + r['variant'] + ']'} |")
    path.write_text("\n".join(lines) + "\n")


def check(records: list[dict], targets: list[int], out_dir: Path, jobs: int) -> list[dict]:
    specs = unique_specs(records)
    work = [(s, cap) for s in specs for cap in targets]
    print(f"[compile] {len(records)} launches -> {len(specs)} specializations x {len(targets)} targets, "
          f"{jobs} processes", flush=True)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        rows = []
        for row in pool.map(compile_one, *zip(*work)):
            row["failures"], row["notes"] = failures(row), notes(row)
            print(format_row(row), flush=True)
            rows.append(row)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    write_markdown(rows, out_dir / "results.md")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="90,80", help="compute capabilities, comma separated (default 90,80)")
    ap.add_argument("--quick", action="store_true",
                    help="the default paths and every attention head dim; not the other API-only cases")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "fastwsss-compile-check")
    ap.add_argument("--from-capture", type=Path, help="compile the launches recorded in this file (skip the capture)")
    ap.add_argument("--only", help="compile only the kernels whose name matches this regular expression")
    ap.add_argument("--capture-to", type=Path, help=argparse.SUPPRESS)  # internal: the capture child
    args = ap.parse_args(argv)
    if args.capture_to:
        capture(args.capture_to, args.quick)
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    captured = args.from_capture
    if captured is None:
        captured = args.out_dir / "captured.json"
        t0 = time.time()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--capture-to", str(captured),
                        *(["--quick"] if args.quick else [])], env={**os.environ, "TRITON_INTERPRET": "1"},
                       check=True)
        print(f"[capture] {time.time() - t0:.0f} s", flush=True)
    records = [r for r in json.loads(captured.read_text()) if not args.only or re.search(args.only, r["kernel"])]
    t0 = time.time()
    rows = check(records, [int(t) for t in args.targets.split(",")], args.out_dir, args.jobs)
    bad = [r for r in rows if r["failures"]]
    print(f"[compile] {len(rows)} compiled in {time.time() - t0:.0f} s: {len(rows) - len(bad)} pass, {len(bad)} fail; "
          f"table in {args.out_dir / 'results.md'}", flush=True)
    for r in bad:
        print(f"FAIL sm_{r['target']} {r['kernel']} ({'; '.join(r['failures'])}) | {r['short']}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
