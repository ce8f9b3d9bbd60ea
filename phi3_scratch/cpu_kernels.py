"""CPU kernels for decoding: the one-row products of a decode step on every core (cpu_kernels.c).

Why: a decode step at batch 1 reads each weight matrix once, to multiply it by one vector.
torch's one-row product (MKL) runs on one core here, at about half of what the memory delivers.
llama.cpp splits each product between the cores; so do these kernels (docs/SPEED.md).

- `linear_f32(x, w)`  is F.linear(x, w) for fp32 on the CPU.
- `linear_int8(x, w, scale)` is Int8Linear's product, as llama.cpp's Q8_0 computes it:
  x rounded to int8 in blocks of 32 (one scale a block), int8 dot products.
  With AVX-512 VNNI it takes a prompt too (`int8_gemm()`): an int8 GEMM, faster than fp32's.
- Both are torch ops (torch.ops.phi3_scratch), so that a compiled decode step calls them too.
- `fast_linear()` routes the model's one-row fp32 products to linear_f32, while it is active.
  The compiled CPU decode step enters it inside the compiled function, and its prompt runs in it
  (compiled.py); plain eager decoding never does.

The C file is compiled on first use with the machine's C compiler (`cc`, or $CC), for this CPU,
into ~/.cache/phi3_scratch (or $PHI3_SCRATCH_CACHE), once per source and CPU.
Without a compiler, or with PHI3_SCRATCH_KERNELS=0, `available()` is False and every caller
keeps torch's own products: the same numbers to rounding, at torch's speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import Phi3Error

SOURCE = Path(__file__).with_name("cpu_kernels.c")
MAX_ROWS = 16  # rows of x the kernels take; more rows are a prefill, where MKL's matmul is faster
# (except int8's with AVX-512 VNNI: int8_gemm())
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
why_not = ""  # why the kernels are not available, once `available()` has said False


def cache_dir() -> Path:
    return Path(os.environ.get("PHI3_SCRATCH_CACHE") or Path.home() / ".cache" / "phi3_scratch")


def cpu_name() -> str:
    """What the compiled file depends on: the architecture and the CPU's instruction sets."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}"


def build() -> Path:
    """The compiled kernels, built now if this source was never built for this CPU."""
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + f"{compiler} {FLAGS} {cpu_name()}".encode()).hexdigest()
    target = cache_dir() / f"cpu_kernels-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        errors = []
        # With OpenMP first: the .so then shares the OpenMP runtime torch has loaded (libgomp).
        for openmp in (["-fopenmp"], []):
            command = [compiler, *FLAGS, *openmp, str(SOURCE), "-o", str(out), "-lm"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise Phi3Error(f"could not run the C compiler {compiler!r}: {e}") from None
            if done.returncode == 0:
                os.replace(out, target)  # atomic: a second process sees all of it or nothing
                return target
            errors.append(done.stderr.strip().splitlines()[-1:] or ["(no message)"])
    raise Phi3Error(f"{compiler} could not compile {SOURCE.name}: {errors[0][0]}")


_lib = None  # the ctypes library, once loaded
_tried = False
_gemm = False  # whether it was built with AVX-512 VNNI's GEMM


def library():
    """The kernels as a ctypes library, built and loaded on the first call; None if they cannot be
    (the reason in `why_not`)."""
    global _lib, _tried, _gemm, why_not
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("PHI3_SCRATCH_KERNELS", "1") == "0":
        why_not = "PHI3_SCRATCH_KERNELS=0"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (Phi3Error, OSError) as e:
        why_not = str(e)
        return None
    P, N = ctypes.c_void_p, ctypes.c_int64
    lib.p3_linear_f32.argtypes = [P, P, P, N, N, N]
    lib.p3_linear_f32.restype = None
    lib.p3_linear_int8.argtypes = [P, P, P, P, N, N, N]
    lib.p3_linear_int8.restype = ctypes.c_int
    lib.p3_int8_gemm.argtypes = []
    lib.p3_int8_gemm.restype = ctypes.c_int
    _gemm = bool(lib.p3_int8_gemm())
    define_ops()
    _lib = lib
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (the first call builds them, outside torch.compile)."""
    if not _tried and not torch.compiler.is_compiling():
        library()
    return _lib is not None


def require() -> None:
    if not available():
        raise Phi3Error(f"the CPU kernels are not available: {why_not}")


def int8_gemm() -> bool:
    """Whether linear_int8 takes any number of rows: built with AVX-512 VNNI, a prompt's int8
    product is a GEMM on int8 pairs, faster than MKL's fp32 one (docs/SPEED.md)."""
    return available() and _gemm


def fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernels can take x @ w^T: CPU, fp32 x, contiguous, no gradient wanted, and
    at most MAX_ROWS rows (any number for int8 weights where int8_gemm())."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and x.shape[-1] == w.shape[1] and w.dim() == 2 and x.is_contiguous() and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and available()
            and (x.shape[:-1].numel() <= MAX_ROWS or (w.dtype == torch.int8 and int8_gemm())))


# The ops: one C call each. The "Meta" version gives the output's shape to torch.compile.
_ops = None


def define_ops() -> None:
    global _ops
    if _ops is not None:
        return
    _ops = torch.library.Library("phi3_scratch", "DEF")
    _ops.define("linear_f32(Tensor x, Tensor w) -> Tensor")
    _ops.define("linear_int8(Tensor x, Tensor w, Tensor scale) -> Tensor")
    for name, cpu in (("linear_f32", _linear_f32), ("linear_int8", _linear_int8)):
        _ops.impl(name, cpu, "CPU")
        _ops.impl(name, _output_like, "Meta")


def _output_like(x, w, scale=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _linear_f32(x, w):
    y = _output_like(x, w)  # (..., n)
    m, (n, k) = x.shape[:-1].numel(), w.shape
    _lib.p3_linear_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k)
    return y


def _linear_int8(x, w, scale):
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.float().contiguous()
    y = _output_like(x, w)
    m, (n, k) = x.shape[:-1].numel(), w.shape
    if _lib.p3_linear_int8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k):
        raise MemoryError(f"linear_int8: no memory for x rounded to int8 ({m} x {k} bytes)")
    return y


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) on every core: x (..., k) fp32, w (n, k) fp32 -> (..., n). Needs fits(x, w)."""
    require()
    return torch.ops.phi3_scratch.linear_f32(x, w)


def linear_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(xq @ w^T) * scale: x (..., k) fp32, w (n, k) int8, scale (n,) -> (..., n). Needs fits(x, w).

    xq is x rounded to int8 in blocks of 32 inputs, each block with its own scale, as in Q8_0."""
    require()
    return torch.ops.phi3_scratch.linear_int8(x, w, scale)


class fast_linear(TorchFunctionMode):
    """While active, F.linear(x, w) without bias runs linear_f32 wherever `fits(x, w)`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, *rest = *args, *kwargs.values()
            if (not rest or rest[0] is None) and w.dtype == torch.float32 and fits(x, w):
                return linear_f32(x, w)
        return func(*args, **kwargs)
