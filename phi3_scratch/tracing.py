"""Seeing inside: traces of every intermediate, the logit lens, and a comparison with transformers.

    with p3.trace(model) as t:          # records a forward pass run inside the block (the last)
        model(input_ids)
    t["layers.3.attn_probs"]            # (B, heads, T, S): the probabilities layer 3 used
    print(t)                            # every name with its shape

Recorded per forward call (each call inside the block starts the records afresh, so they are
always one pass's; logits only when the call went through Phi3ForCausalLM, not its body alone):
    embed, positions, mask (the additive fp32 mask), final_norm, logits (through Phi3ForCausalLM)
    layers.{i}.input_norm   the normed input of the attention              (B, T, H)
    layers.{i}.q_raw / k_raw  q and k before rotary, new positions only      (B, nH or nKV, T, hd)
    layers.{i}.q            after rotary, new positions only                (B, nH, T, hd)
    layers.{i}.k / v        k after rotary, v as computed, new positions   (B, nKV, T, hd)
    layers.{i}.scores       q k^T / sqrt(hd), before the mask and softmax   (B, nH, T, S)
    layers.{i}.attn_probs   softmax(scores + mask)                          (B, nH, T, S)
    layers.{i}.head_out     each head's output, before o_proj joins them    (B, nH, T, hd)
    layers.{i}.attn_out     the attention's output, after o_proj              (B, T, H)
    layers.{i}.attn_residual, post_attn_norm, mlp_out, residual (the layer's output)
    layers.{i}.mlp_act      up * silu(gate), the input of down_proj         (B, T, I)

- The model calls a tap at each of these points (model.untouched, or the active probe).
  When no trace is active, the tap passes every tensor on: a Python call per point, nothing more.
- `trace(model, only=...)` keeps just the names listed, as bare names kept in every layer
  (`{"attn_probs"}`, not "layers.3.attn_probs").
- Scores and probabilities are T x S per head: a long prompt makes them the largest thing in memory.
- p3.intervene (intervene.py) edits the same points; inside a trace, the edited values are recorded.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import Phi3Error, is_number, type_name
from .checks import check_input_ids, check_on_device
from .generation import as_causal_lm
from .model import Phi3ForCausalLM

MODEL_NAMES = ("embed", "positions", "mask", "final_norm", "logits")
LAYER_NAMES = ("input_norm", "q_raw", "k_raw", "q", "k", "v", "scores", "attn_probs", "head_out", "attn_out",
               "attn_residual", "post_attn_norm", "mlp_act", "mlp_out", "residual")
EAGER_NAMES = {"scores", "attn_probs"}  # only the eager attention kernel writes these out


class Records(dict):
    """The tap for one layer's points, or the model's: name -> tensor, as the forward pass goes.

    - It records the names asked for (all, or those in `only`) while `recording`.
    - It applies the edit p3.intervene gave for a name (`edits`), then records the edited tensor.
    """

    def __init__(self, only: set[str] | None = None, recording: bool = True, where: str = ""):
        super().__init__()
        self.only, self.recording, self.where = only, recording, where  # where: "layers.3." or ""
        self.edits = {}  # name -> edit(point, tensor) -> tensor, from intervene.py

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        edit = self.edits.get(name)
        if edit is not None:
            tensor = edit(self.where + name, tensor)
        if self.recording and (self.only is None or name in self.only):
            self[name] = tensor
        return tensor

    @property
    def eager(self) -> bool:
        """Whether attention must run the eager kernel: to record, or to edit, the probabilities."""
        return self.recording or bool(EAGER_NAMES & self.edits.keys())


class Trace(Records):
    """The records of one forward pass, and the probe the model taps (model.untouched says how).

    - Model-level names (embed, positions, mask, final_norm, logits) live in the dict itself, layer i's
      in `layers[i]`.
    - `t["layers.3.q"]`, `"layers.3.q" in t`, `t.get(...)`, len(t), iterating, keys(), items() and
      `t.flat()` (everything, in forward order) read both.
    - p3.intervene alone installs one that records nothing and only edits.
    """

    def __init__(self, num_layers: int, only: set[str] | None = None, recording: bool = True):
        super().__init__(only, recording)
        self.layers = [Records(only, recording, f"layers.{i}.") for i in range(num_layers)]

    def begin(self, positions: torch.Tensor, mask: torch.Tensor) -> "Trace":
        """A forward pass starts: forget the last one's records, keep this one's positions and mask."""
        self.clear()
        self("positions", positions)  # inputs of the layers: recorded, never edited (intervene.where)
        self("mask", mask)
        return self

    def __getitem__(self, name: str) -> torch.Tensor:
        records = self.flat()
        if name not in records:  # a KeyError that says what there is
            raise KeyError(f"no record {name!r} in this trace (print(trace) lists its {len(records)} names; "
                           f"a layer's are layers.<0..{len(self.layers) - 1}>.<{'|'.join(LAYER_NAMES)}>)")
        return records[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.flat()

    def clear(self) -> None:
        """Forget every record, the layers' too (the model does this as each forward pass begins)."""
        super().clear()
        for layer in self.layers:
            layer.clear()

    def get(self, name: str, default=None):
        return self.flat().get(name, default)

    def __iter__(self):
        return iter(self.flat())

    def __len__(self) -> int:
        return len(self.flat())

    def keys(self):
        return self.flat().keys()

    def items(self):
        return self.flat().items()

    def values(self):
        return self.flat().values()

    def flat(self) -> dict[str, torch.Tensor]:
        """Every record in forward order: embed, layers.0.input_norm, ..., final_norm, logits."""
        top = lambda names: {k: dict.__getitem__(self, k) for k in names if dict.__contains__(self, k)}
        out = top(("embed", "positions", "mask"))
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": layer[k] for k in LAYER_NAMES if k in layer})
        out.update(top(("final_norm", "logits")))
        return out

    def __repr__(self) -> str:
        return "Trace(\n" + "".join(f"  {k}: {tuple(v.shape)}\n" for k, v in self.flat().items()) + ")"


@contextmanager
def trace(model: Phi3ForCausalLM, only: set[str] | None = None):
    """Record the intermediates of the forward passes run inside the `with` block.

    - Each pass replaces the one before; only the names in `only` are kept, when given.
    - Traces nest: an inner block hands the outer one back when it ends.
    - An intervention active around the block stays active in it, and its edits are recorded.
    """
    if isinstance(only, str):
        raise Phi3Error(f"trace(only=...) takes a set of names, e.g. {{{only!r}}}, got the string {only!r}")
    if only is not None:
        if not only:
            raise Phi3Error("trace(only=...) is empty, so nothing would be recorded: "
                            "give names, or None for all")
        known = {*MODEL_NAMES, *LAYER_NAMES}
        if not set(only) <= known:
            unknown = sorted(set(only) - known, key=str)
            raise Phi3Error(f"trace(only=...): {unknown} are not names a trace records; expected a set "
                            f"of bare names (a layer's are kept in every layer) from {sorted(known)}")
        only = set(only)
    body = as_causal_lm(model, "trace(model)").model
    outer, body.probe = body.probe, Trace(len(body.layers), only)
    if outer is not None:  # an intervention around this block goes on editing
        body.probe.edits = dict(outer.edits)
        for mine, theirs in zip(body.probe.layers, outer.layers):
            mine.edits = dict(theirs.edits)
    try:
        yield body.probe
    finally:
        body.probe = outer


@torch.no_grad()
def logit_lens(model: Phi3ForCausalLM, input_ids: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
    """What each layer would predict if it were the last: head(final_norm(residual after layer i)).

    Returns fp32 logits (num_layers, B, V) for the last position, or (num_layers, B, T, V) for
    every position; the last layer's equal the model's own logits.
    """
    model = as_causal_lm(model, "logit_lens(model, input_ids)")
    if not isinstance(all_positions, bool):
        raise Phi3Error(f"logit_lens: all_positions must be True or False, got {all_positions!r}")
    with trace(model, only={"residual"}) as t:
        model.model(input_ids)
    residuals = torch.stack([layer["residual"] for layer in t.layers])  # (L, B, T, H)
    if not all_positions:
        residuals = residuals[:, :, -1]  # (L, B, H)
    return lens_logits(model, residuals)  # (L, B, [T,] V)


def lens_logits(model: Phi3ForCausalLM, residuals: torch.Tensor) -> torch.Tensor:
    """What a residual stream would predict: fp32 logits of head(final_norm(h)), (..., H) -> (..., V)."""
    return model.lm_head(model.model.norm(residuals)).float()


# ------------------------------------------------------------------ comparison with transformers

# What transformers' modules return, by our trace names (per layer where it says layers.{i}).
HF_HOOKS = {
    "embed": "model.embed_tokens",
    "layers.{i}.input_norm": "model.layers.{i}.input_layernorm",
    "layers.{i}.attn_out": "model.layers.{i}.self_attn",
    "layers.{i}.attn_probs": "model.layers.{i}.self_attn",
    "layers.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm",
    "layers.{i}.mlp_out": "model.layers.{i}.mlp",
    "layers.{i}.residual": "model.layers.{i}",
    "final_norm": "model.norm",
}


def default_tolerance(dtype: torch.dtype) -> float:
    """Largest accepted |ours - theirs| / max|theirs|: float32 rounding, or bf16's 8-bit mantissa."""
    return 1e-5 if dtype == torch.float32 else 2e-2


@torch.no_grad()
def compare_with_transformers(model: Phi3ForCausalLM, hf_model, input_ids: torch.Tensor,
                              tolerance: float | None = None) -> list[dict]:
    """Run both models on the same input and compare every intermediate, in forward order.

    Returns one row per tensor: name, shape, max_abs (max |ours - theirs|), rel (max_abs divided
    by max |theirs|), ok (rel <= tolerance) and first_bad (True on the first row that is not ok,
    the place to start looking). `hf_model` is transformers' Phi3ForCausalLM on the same weights
    (eager attention, so that it returns its attention probabilities).
    """
    model = as_causal_lm(model, "compare_with_transformers(model, hf_model, input_ids)")
    if type(hf_model).__name__ != "Phi3ForCausalLM" or isinstance(hf_model, Phi3ForCausalLM):
        raise Phi3Error(f"compare_with_transformers(model, hf_model, input_ids): "
                        f"hf_model must be transformers' Phi3ForCausalLM, got {type_name(hf_model)}")
    ours_shape, theirs_shape = shape_of(model.config), shape_of(hf_model.config)
    if ours_shape != theirs_shape:
        fields = ", ".join(f"{k} {ours_shape[k]} vs {theirs_shape[k]}" for k in ours_shape
                           if ours_shape[k] != theirs_shape[k])
        raise Phi3Error(f"compare_with_transformers: the two models have different shapes "
                        f"(ours vs transformers'): {fields}; load both from one checkpoint")
    check_input_ids(input_ids, model.config.vocab_size)
    weight = model.model.embed_tokens.weight
    check_on_device(weight.device, input_ids=input_ids)
    tolerance = default_tolerance(weight.dtype) if tolerance is None else tolerance
    if not is_number(tolerance) or not 0 < tolerance < float("inf"):
        raise Phi3Error(f"tolerance must be a positive number (a relative difference), got {tolerance!r}")
    theirs_dtype = next(hf_model.parameters()).dtype
    if theirs_dtype != weight.dtype:
        raise Phi3Error(f"the two models run in different dtypes, ours {weight.dtype} and transformers' "
                        f"{theirs_dtype}: every tensor would differ by the rounding; load both in one dtype")
    if getattr(hf_model.config, "_attn_implementation", None) != "eager":
        raise Phi3Error("compare_with_transformers needs transformers' model with "
                        "attn_implementation='eager' (it returns its attention probabilities), "
                        f"got {hf_model.config._attn_implementation!r}")
    theirs, handles = {}, []
    for name, module_name in _expand(HF_HOOKS, len(model.model.layers)).items():
        def keep(module, args, output, name=name):  # name=name: bind this loop's name, not the last one
            if name.endswith("attn_probs"):
                output = output[1]  # (attn_output, attn_weights)
            elif isinstance(output, tuple):
                output = output[0]
            theirs[name] = output
        handles.append(hf_model.get_submodule(module_name).register_forward_hook(keep))
    try:
        theirs["logits"] = hf_model(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with trace(model) as t:
        model(input_ids)
    ours = t.flat()

    rows, seen_bad = [], False
    for name in ours:
        if theirs.get(name) is None:  # q, k, v, masks: transformers does not expose them
            continue
        a, b = ours[name].float(), theirs[name].float()
        if a.shape != b.shape:  # a port with the wrong shape somewhere: say so, do not crash
            max_abs = rel = float("inf")
        else:
            max_abs = (a - b).abs().max().item()
            rel = max_abs / max(b.abs().max().item(), 1e-30)
        ok = rel <= tolerance
        rows.append(dict(name=name, shape=tuple(a.shape), max_abs=max_abs, rel=rel, ok=ok,
                         first_bad=not ok and not seen_bad))
        seen_bad = seen_bad or not ok
    return rows


def shape_of(config) -> dict:
    """The config fields that decide the tensors compared (both libraries' configs have them)."""
    names = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "vocab_size")
    return {name: getattr(config, name, None) for name in names}


def _expand(table: dict[str, str], num_layers: int) -> dict[str, str]:
    out = {}
    for name, module in table.items():
        for i in range(num_layers) if "{i}" in name else [None]:
            out[name.format(i=i)] = module.format(i=i)
    return out


def format_comparison(rows: list[dict], tolerance: float) -> str:
    lines = [f"{'tensor':28s}{'shape':>18s}{'max |diff|':>13s}{'relative':>11s}"]
    for r in rows:
        mark = f"   <-- first above {tolerance:g}" if r["first_bad"] else ("   above" if not r["ok"] else "")
        lines.append(f"{r['name']:28s}{str(r['shape']):>18s}{r['max_abs']:>13.3e}{r['rel']:>11.2e}{mark}")
    bad = [r for r in rows if not r["ok"]]
    lines.append(f"{len(rows)} tensors compared, tolerance {tolerance:g} "
                 f"(relative to each tensor's largest value): "
                 + (f"{len(bad)} above, first {bad[0]['name']}" if bad else "all within"))
    return "\n".join(lines)
