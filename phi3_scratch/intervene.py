"""Interventions: change an activation inside the forward pass and see what the change does.

    with p3.intervene(model, {"layers.1.head_out": zero_head_2}):
        logits = model(input_ids)              # every forward pass in the block is edited
        out = p3.generate(model, input_ids)    # the prefill and every decode step too

- A point is a name a trace records (tracing.py lists them): "layers.3.mlp_act", "embed", ...
- Its function receives the tensor there (a copy) and returns the replacement: the same shape,
  dtype and device. None leaves the tensor as it was.
- Edits reach model(...), generate, stream_tokens, the Stepper and traces (which record the edited
  values). compile=True is refused: a compiled step runs code no Python edit reaches.
- After the block, the model is exactly as before.

The helpers below build the common edits, each a dict to pass to intervene:
- ablate_head(layer, head): that head's output is zero, so o_proj never sees it.
- ablate_neuron(layer, index): one channel of the MLP's activation is zero.
- patch(point, source): the tensor recorded at `point` in another run (activation patching).
- steer(layer, vector): a vector added to the residual stream after `layer` (steering).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from .errors import Phi3Error, is_integer, is_number, type_name
from .generation import as_causal_lm
from .tracing import LAYER_NAMES, Trace

MODEL_POINTS = ("embed", "final_norm", "logits")  # positions and mask are inputs of the layers, not edits
TOKEN_AXIS = {"q_raw": 2, "k_raw": 2, "q": 2, "k": 2, "v": 2, "scores": 2, "attn_probs": 2, "head_out": 2}


@contextmanager
def intervene(model, edits: dict[str, Callable]):
    """Apply `edits` (point -> function) to every forward pass run inside the `with` block."""
    model = as_causal_lm(model, "intervene(model, edits)")
    body = model.model
    if not isinstance(edits, dict) or not edits:
        raise Phi3Error(f"intervene(model, edits): edits must be a non-empty dict of point -> function, "
                        f"got {edits!r:.80}")
    places = {point: where(point, len(body.layers)) for point in edits}
    for point, fn in edits.items():
        if not callable(fn):
            raise Phi3Error(f"intervene: the edit for {point!r} must be a function of the tensor, got "
                            f"{type_name(fn)}")
    probe, installed = body.probe, body.probe is None
    if installed:  # no trace around the block: a probe that only edits
        probe = body.probe = Trace(len(body.layers), recording=False)
    saved = [dict(probe.edits)] + [dict(layer.edits) for layer in probe.layers]
    for point, (layer, name) in places.items():
        (probe if layer is None else probe.layers[layer]).edits[name] = checked(edits[point])
    try:
        yield model
    finally:
        if installed:
            body.probe = None
        else:
            probe.edits = saved[0]
            for layer, kept in zip(probe.layers, saved[1:]):
                layer.edits = kept


def where(point: str, num_layers: int) -> tuple[int | None, str]:
    """(layer index or None, name) for a point's name; a Phi3Error that says what exists otherwise."""
    names = f"a layer's points are layers.<0..{num_layers - 1}>.<{'|'.join(LAYER_NAMES)}>; " \
            f"the model's are {', '.join(MODEL_POINTS)}"
    if not isinstance(point, str):
        raise Phi3Error(f"intervene: a point is a name like 'layers.0.head_out', got {point!r:.60}; {names}")
    if point in MODEL_POINTS:
        return None, point
    parts = point.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in LAYER_NAMES:
        raise Phi3Error(f"intervene: {point!r} is not a point of the forward pass; {names}")
    if int(parts[1]) >= num_layers:
        raise Phi3Error(f"intervene: {point!r}: the model has {num_layers} layers, 0..{num_layers - 1}")
    return int(parts[1]), parts[2]


def checked(fn: Callable) -> Callable:
    """The edit the model's tap applies: fn on a copy, and its result checked against the original."""
    def edit(point: str, tensor: torch.Tensor) -> torch.Tensor:
        new = fn(tensor.clone())
        if new is None:
            return tensor
        if not isinstance(new, torch.Tensor):
            raise Phi3Error(f"intervene: the edit for {point} returned {type_name(new)}; expected a tensor "
                            "of "
                            f"shape {tuple(tensor.shape)} (or None to leave it)")
        if new.shape != tensor.shape or new.dtype != tensor.dtype or new.device != tensor.device:
            raise Phi3Error(f"intervene: the edit for {point} returned shape {tuple(new.shape)}, {new.dtype} "
                            "on "
                            f"{new.device}; expected shape {tuple(tensor.shape)}, {tensor.dtype} on "
                            f"{tensor.device}")
        return new
    return edit


def ablate_head(layer: int, head: int) -> dict[str, Callable]:
    """Zero one query head's output in one layer: o_proj then sees nothing from it."""
    for name, value in (("layer", layer), ("head", head)):
        if not is_integer(value) or value < 0:
            raise Phi3Error(f"ablate_head: {name} must be an integer >= 0, got {value!r}")

    def zero(out: torch.Tensor) -> torch.Tensor:  # (B, nH, T, hd)
        if head >= out.shape[1]:
            raise Phi3Error(f"ablate_head: head {head}: layer {layer} has {out.shape[1]} heads, "
                            f"0..{out.shape[1] - 1}")
        out[:, head] = 0
        return out
    return {f"layers.{layer}.head_out": zero}


def ablate_neuron(layer: int, index: int) -> dict[str, Callable]:
    """Zero one channel of the MLP's activation up * silu(gate): down_proj's input there is 0."""
    for name, value in (("layer", layer), ("index", index)):
        if not is_integer(value) or value < 0:
            raise Phi3Error(f"ablate_neuron: {name} must be an integer >= 0, got {value!r}")

    def zero(act: torch.Tensor) -> torch.Tensor:  # (B, T, I)
        if index >= act.shape[-1]:
            raise Phi3Error(f"ablate_neuron: index {index}: layer {layer}'s MLP has {act.shape[-1]} "
                            "channels, "
                            f"0..{act.shape[-1] - 1}")
        act[..., index] = 0
        return act
    return {f"layers.{layer}.mlp_act": zero}


def patch(point: str, source: torch.Tensor, positions: list[int] | None = None) -> dict[str, Callable]:
    """Put `source`, recorded at `point` in another run (a trace), in place of this run's tensor.

    - positions: the token positions to patch (all when None); the rest stays this run's.
    - Only a pass whose tensor has the source's shape is patched: a prompt's, not the decode steps
      that follow it (their tensors hold one new position).
    """
    name = point.rsplit(".", 1)[-1]
    if not isinstance(source, torch.Tensor):
        raise Phi3Error(f"patch({point!r}, source): source must be a tensor (from a trace), got "
                        f"{type_name(source)}")
    axis = TOKEN_AXIS.get(name, 1)

    def replace(x: torch.Tensor) -> torch.Tensor | None:
        if x.shape != source.shape:
            return None  # another pass (a decode step): not the one the source was recorded in
        if positions is None:
            return source.to(x.device, x.dtype).clone()
        index = torch.tensor(positions, device=x.device)
        return x.index_copy(axis, index, source.to(x.device, x.dtype).index_select(axis, index))
    return {point: replace}


def steer(layer: int, vector: torch.Tensor, scale: float = 1.0) -> dict[str, Callable]:
    """Add scale * vector (H,) to the residual stream after `layer`, at every position of every pass."""
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
        raise Phi3Error(f"steer: vector must be a 1-D tensor of the hidden size, got {vector!r:.60}")
    if not is_number(scale):
        raise Phi3Error(f"steer: scale must be a number, got {scale!r}")

    def add(h: torch.Tensor) -> torch.Tensor:  # (B, T, H)
        if vector.shape[0] != h.shape[-1]:
            raise Phi3Error(f"steer: the vector has {vector.shape[0]} numbers; the residual stream has "
                            f"{h.shape[-1]} (the hidden size)")
        return h + scale * vector.to(h.device, h.dtype)
    return {f"layers.{layer}.residual": add}
