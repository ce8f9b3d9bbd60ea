"""int8 weight-only quantization: every matrix of the decoder layers (and an untied head) in int8.

A decode step at batch 1 reads every weight once, so its speed is the memory bandwidth divided
by the bytes of the weights: int8 reads half the bytes of bf16. Weight-only means the
activations stay in the model's dtype, and each matrix is stored as

    weight  int8 (out, in)        round(w / scale), in -127..127
    scale   (out,) model dtype    max |w| of that output row / 127: one scale per output channel

and used as  y = (x @ weight^T) * scale,  the int8 matrix converted inside the matmul. Symmetric
(no zero point), per output channel: the scale of row o multiplies output o only, so it can be
applied after the product. Compiled (`compile=True`), a decode step's one-row products become
reduction kernels that read the int8 matrix and convert each entry as they go: a step reads a
quarter of fp32's bytes, on the CPU and on a GPU. Run eagerly, torch converts the whole matrix
first, so int8 saves memory there, not time.

The embedding stays in the model's dtype (a decode step reads one row of it), and so do the norms.
A quantized model is saved (`save_pretrained`) with its int8 weights and scales and a
"quantization" entry in config.json, and loads back as it was saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import Phi3Error

METHODS = ("int8",)
LAYER_MATRICES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class Int8Linear(nn.Module):
    """nn.Linear without bias, its weight in int8 with one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)  # (out, in), -127..127
        self.scale = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device), requires_grad=False)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            # One row (a decode step at batch 1), compiled: the product written as multiply-and-sum,
            # which torch.compile turns into one reduction kernel that reads each int8 weight and
            # converts it as it goes. (On a GPU, inductor writes any one-row matmul this way when
            # coordinate-descent tuning is on; on the CPU it would call the BLAS on a converted copy.)
            y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
            return y.to(x.dtype) * self.scale
        return F.linear(x, self.weight.to(x.dtype)) * self.scale  # (..., out): (x @ q^T) * s

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale) of a weight matrix (out, in): symmetric, one scale per row."""
    w32 = w.float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,); an all-zero row keeps a tiny scale
    q = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale.to(w.dtype)


def quantized_names(model) -> list[str]:
    """The modules int8 replaces: the decoder layers' four matrices, and the head unless it is tied."""
    names = [f"model.layers.{i}.{m}" for i in range(len(model.model.layers)) for m in LAYER_MATRICES]
    return names + ([] if model.config.tie_word_embeddings else ["lm_head"])


def check_method(quantize) -> None:
    if quantize is not None and quantize not in METHODS:
        raise Phi3Error(f"quantize must be None or one of {list(METHODS)}, got {quantize!r}")


def swap_in_int8(model, name: str, dtype: torch.dtype) -> tuple[nn.Module, Int8Linear]:
    """Replace the module `name` by an empty Int8Linear of its shape, on its device; (old, new)."""
    parent, _, attr = name.rpartition(".")
    old = model.get_submodule(name)
    new = Int8Linear(old.in_features, old.out_features, dtype=dtype, device=old.weight.device)
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return old, new


def use_int8_modules(model, dtype: torch.dtype) -> None:
    """Swap each quantized nn.Linear for an empty Int8Linear of its shape, on the same device (meta included)."""
    for name in quantized_names(model):
        swap_in_int8(model, name, dtype)


@torch.no_grad()
def quantize_model(model, method: str = "int8"):
    """Quantize a loaded model in place (each matrix replaced as it is done); returns the model."""
    check_method(method)
    for name in quantized_names(model):
        if not isinstance(model.get_submodule(name), Int8Linear):
            old, new = swap_in_int8(model, name, model.get_submodule(name).weight.dtype)
            new.weight.data, new.scale.data = quantize_int8(old.weight)
    model.config.quantization = method
    return model


def save_pretrained(model, folder: str | Path) -> None:
    """config.json (official format, with its "quantization"), generation_config.json, model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    generation = {"eos_token_id": config.stop_token_ids, "bos_token_id": config.bos_token_id,
                  "pad_token_id": config.pad_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding, stored once
    save_file(state, str(folder / "model.safetensors"))
