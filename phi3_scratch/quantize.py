"""Weight-only quantization: every matrix of the decoder layers (and an untied head) in 8 or 4 bits.

A decode step at batch 1 reads every weight once, so its speed is the memory bandwidth divided
by the bytes of the weights: int8 reads half the bytes of bf16, int4 a quarter. Weight-only means
the activations stay in the model's dtype; each matrix (out, in) is stored as small integers
and the few numbers that turn them back into weights:

    int8   weight  int8 (out, in)         round(w / scale), in -127..127
           scale   (out,)                 max |w| of that output row / 127: one per output channel
           used as  y = (x @ weight^T) * scale     (symmetric: the scale of row o multiplies output o)

    int4   weight  uint8 (out, in / 2)    two 4-bit numbers n in 0..15 a byte, in groups of 128 inputs
           scale   (out, in / 128)        (max - min of the group's 128 weights) / 15
           offset  (out, in / 128)        min of the group: w = n * scale + offset
           used as  y = x @ w^T, w rebuilt group by group

int4 needs groups: 16 levels spread out to the extremes of a whole row of 3,072 weights would
leave the two thirds of them that lie within one standard deviation of zero about four levels;
a group of 128 has narrower extremes and its own offset. Inside a group, byte j holds input j
(low 4 bits) and input 64 + j (high 4 bits), as llama.cpp packs its blocks, so that a byte is
unpacked by two bitwise operations and no interleaving.

Compiled (`compile=True`), a decode step's one-row products become reduction kernels.
They read the packed matrix and convert each entry as they go.
A step then reads about a quarter (int8) or a seventh (int4, scales and offsets included) of fp32's bytes.
Run eagerly, torch converts the whole matrix first: quantization saves memory there, not time.
On the CPU, int8 runs cpu_kernels.linear_int8 instead, eager or compiled: a decode step, and with
AVX-512 VNNI a prompt too.
The embedding stays in the model's dtype (a decode step reads one row of it), and so do the norms.
A quantized model is saved (`save_pretrained`, saving.py) with its integer weights, scales (and
offsets) and a "quantization" entry in config.json, and loads back as it was saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .config import QUANTIZATIONS
from .errors import Phi3Error

LAYER_MATRICES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
GROUP = 128  # int4: inputs that share a scale and an offset


def one_row_compiled(x: torch.Tensor) -> bool:
    """A decode step at batch 1 being compiled: the products below are then written as multiply-and-sum,
    which torch.compile turns into one reduction kernel that reads each packed weight and converts it
    as it goes. (On a GPU, inductor writes any one-row matmul this way when coordinate-descent tuning
    is on; on the CPU it would call the BLAS on a converted copy of the matrix.)"""
    return torch.compiler.is_compiling() and x.shape[:-1].numel() == 1


class Int8Linear(nn.Module):
    """nn.Linear without bias, its weight in int8 with one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)  # (out, in), -127..127
        self.scale = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device),
                                  requires_grad=False)  # (out,)
        if self.weight.device.type == "cpu":
            cpu_kernels.available()  # built and loaded now, not first inside torch.compile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step on the CPU (and a prompt, with AVX-512 VNNI): int8 dot products on every core
        if cpu_kernels.fits(x, self.weight):
            return cpu_kernels.linear_int8(x, self.weight, self.scale)
        if one_row_compiled(x):
            # (..., 1, in) * (out, in) -> (..., out)
            y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)
            return y.to(x.dtype) * self.scale
        if x.device.type == "cpu" and not torch.compiler.is_compiling():  # a prompt on the CPU
            return product_in_chunks(x, self.weight, self.scale)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale  # (..., out): (x @ q^T) * s

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize the full-precision matrix w (out, in) into this module's tensors."""
        self.weight, self.scale = (nn.Parameter(t, requires_grad=False) for t in quantize_int8(w))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


CHUNK_BYTES = 2**22  # converted weights at a time on the CPU: 4 MB stay in its cache


def product_in_chunks(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x @ q^T) * scale, q converted to x's dtype a few rows at a time: (..., in) -> (..., out).

    A full-size converted copy would be written to memory and read back for every product; these
    rows are written to the CPU's cache and read from it (a 256-token prompt: a few percent faster)."""
    rows = max(1, CHUNK_BYTES // (q.shape[1] * x.element_size()))
    out = x.new_empty(*x.shape[:-1], q.shape[0])  # (..., out)
    x2, out2 = x.reshape(-1, q.shape[1]), out.view(-1, q.shape[0])  # (tokens, in), (tokens, out)
    for start in range(0, q.shape[0], rows):
        w = q[start : start + rows].to(x.dtype)  # (rows, in)
        torch.mul(x2 @ w.T, scale[start : start + rows], out=out2[:, start : start + rows])
    return out


class Int4Linear(nn.Module):
    """nn.Linear without bias, its weight in 4 bits: groups of 128 inputs, each with a scale and an offset."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if in_features % GROUP:
            raise Phi3Error(f"int4 quantizes groups of {GROUP} inputs; in_features {in_features} "
                            f"is not a multiple of {GROUP}")
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // GROUP
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
            requires_grad=False)  # (out, in / 2): two 4-bit numbers a byte
        self.scale = nn.Parameter(torch.ones(out_features, groups, dtype=dtype, device=device),
                                  requires_grad=False)
        self.offset = nn.Parameter(torch.zeros(out_features, groups, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, groups = self.scale.shape
        packed = self.weight.view(out, groups, GROUP // 2)  # byte j of a group: inputs j and 64 + j
        # n of each group's inputs 0..63 (the low 4 bits) and 64..127 (the high 4 bits):
        # (out, groups, 64) each
        first_half, second_half = packed & 15, packed >> 4
        scale, offset = self.scale[..., None], self.offset[..., None]  # (out, groups, 1)
        if one_row_compiled(x):
            # The weights are rebuilt in fp32 inside the reduction, never stored (the eager path
            # below rounds them to x's dtype first: in bf16 the two differ by that rounding).
            x_halves = x.reshape(groups, 2, GROUP // 2).float()  # each group's inputs 0..63 and 64..127
            w_first = first_half.float() * scale.float() + offset.float()  # (out, groups, 64)
            w_second = second_half.float() * scale.float() + offset.float()
            # (out,): one pass over the bytes
            y = (x_halves[:, 0] * w_first + x_halves[:, 1] * w_second).sum((-2, -1))
            return y.to(x.dtype).view(*x.shape[:-1], out)
        n = torch.cat([first_half, second_half], dim=-1).to(x.dtype)  # (out, groups, 128), 0..15
        w = torch.addcmul(offset, n, scale)  # offset + n * scale, in one pass over the matrix
        return F.linear(x, w.view(out, self.in_features))

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize the full-precision matrix w (out, in) into this module's tensors."""
        self.weight, self.scale, self.offset = (nn.Parameter(t, requires_grad=False)
                                                for t in quantize_int4(w))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 in groups of {GROUP}"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale) of a weight matrix (out, in): symmetric, one scale per row."""
    w32 = w.float()
    # Rounded to the model's dtype first, so that q is chosen for the scale that will be stored. A
    # scale of 0 (an all-zero row, or one below the dtype's smallest number) becomes 1: q is 0 there.
    scale = (w32.abs().amax(dim=1) / 127).to(w.dtype)  # (out,)
    scale = scale.masked_fill(scale == 0, 1)
    q = torch.round(w32 / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 weight (out, in / 2), scale, offset (out, in / 128)) of a weight matrix (out, in)."""
    out, n_in = w.shape
    grouped = w.float().view(out, n_in // GROUP, GROUP)  # (out, groups, 128)
    w_min, w_max = grouped.amin(-1), grouped.amax(-1)  # (out, groups)
    # Rounded to the model's dtype first, so that the numbers below are chosen for the scale and
    # offset that will be stored. A scale of 0 (a constant group) becomes 1: n is 0 there.
    offset = w_min.to(w.dtype)
    scale = ((w_max - w_min) / 15).to(w.dtype)
    scale = scale.masked_fill(scale == 0, 1)
    n = torch.round((grouped - offset.float()[..., None]) /
                    scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    packed = n[..., : GROUP // 2] | (n[..., GROUP // 2 :] << 4)  # (out, groups, 64): inputs j and 64 + j
    return packed.view(out, n_in // 2), scale, offset


LINEAR = {"int8": Int8Linear, "int4": Int4Linear}  # method -> the module that replaces nn.Linear
METHODS = QUANTIZATIONS  # the methods config.json may name, one module each in LINEAR


def quantized_names(model) -> list[str]:
    """The modules quantization replaces: the decoder layers' four matrices, and the head unless it
    is tied."""
    names = [f"model.layers.{i}.{m}" for i in range(len(model.model.layers)) for m in LAYER_MATRICES]
    return names + ([] if model.config.tie_word_embeddings else ["lm_head"])


def check_method(quantize) -> None:
    if quantize is not None and quantize not in METHODS:
        raise Phi3Error(f"quantize must be None or one of {list(METHODS)}, got {quantize!r}")


def method_to_load(requested: str | None, saved: str | None, where) -> str | None:
    """The quantization a load ends with: a checkpoint saved quantized keeps its method, and asking
    for another is refused (its integers cannot be quantized again)."""
    if requested and saved and requested != saved:
        raise Phi3Error(f"{where}: the checkpoint is quantized as {saved}; "
                        f"it cannot be loaded as {requested}")
    return requested or saved


def swap_in(model, name: str, method: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """Replace the module `name` by an empty quantized one of its shape, on its device; (old, new)."""
    parent, _, attr = name.rpartition(".")
    old = model.get_submodule(name)
    try:
        new = LINEAR[method](old.in_features, old.out_features, dtype=dtype, device=old.weight.device)
    except Phi3Error as e:  # a width int4 cannot group: say which matrix
        raise Phi3Error(f"{name}: {e}") from None
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return old, new


def use_quantized_modules(model, method: str, dtype: torch.dtype) -> None:
    """Swap each quantized nn.Linear for an empty module of `method` of its shape, on the same device
    (meta included)."""
    for name in quantized_names(model):
        swap_in(model, name, method, dtype)


@torch.no_grad()
def quantize_model(model, method: str = "int8"):
    """Quantize a loaded model in place (each matrix replaced as it is done); returns the model."""
    check_method(method)
    if model.config.quantization not in (None, method):
        raise Phi3Error(f"the model is quantized as {model.config.quantization}; "
                        f"it cannot be quantized as {method}")
    for name in quantized_names(model):
        if not isinstance(model.get_submodule(name), LINEAR[method]):
            old, new = swap_in(model, name, method, model.get_submodule(name).weight.dtype)
            new.set_weight(old.weight)
    model.config.quantization = method
    return model
