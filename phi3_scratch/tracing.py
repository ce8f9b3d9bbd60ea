"""Seeing inside: traces of every intermediate, the logit lens, and a comparison with transformers.

    with p3.trace(model) as t:          # records the forward passes run inside the block
        model(input_ids)
    t["layers.3.attn_probs"]            # (B, heads, T, S): the probabilities layer 3 used
    print(t)                            # every name with its shape

Recorded per forward call (a later call inside the block replaces the earlier values):
    embed, positions, mask (the additive fp32 mask), final_norm, logits (through Phi3ForCausalLM)
    layers.{i}.input_norm   the normed input of the attention              (B, T, H)
    layers.{i}.q / k / v    after rotary, new positions only            (B, heads, T, hd)
    layers.{i}.attn_probs   softmax(q k^T / sqrt(hd) + mask)                (B, nH, T, S)
    layers.{i}.attn_out     the attention's output, after o_proj              (B, T, H)
    layers.{i}.attn_residual, post_attn_norm, mlp_out, residual (the layer's output)
When no trace is active the model runs its plain path: the only cost is one `is None` test.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .model import Phi3ForCausalLM

LAYER_NAMES = ("input_norm", "q", "k", "v", "attn_probs", "attn_out", "attn_residual", "post_attn_norm",
               "mlp_out", "residual")


class Trace(dict):
    """name -> tensor. Model-level names live in the dict itself, layer i's in `layers[i]`;
    `t["layers.3.q"]` and `t.flat()` read both."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.layers = [{} for _ in range(num_layers)]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name.startswith("layers."):
            _, i, key = name.split(".", 2)
            return self.layers[int(i)][key]
        return super().__getitem__(name)

    def flat(self) -> dict[str, torch.Tensor]:
        """Every record in forward order: embed, layers.0.input_norm, ..., final_norm, logits."""
        out = {k: self[k] for k in ("embed", "positions", "mask") if k in self}
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": layer[k] for k in LAYER_NAMES if k in layer})
        out.update({k: self[k] for k in ("final_norm", "logits") if k in self})
        return out

    def __repr__(self) -> str:
        return "Trace(\n" + "".join(f"  {k}: {tuple(v.shape)}\n" for k, v in self.flat().items()) + ")"


@contextmanager
def trace(model: Phi3ForCausalLM):
    """Record the intermediates of every forward pass run inside the `with` block."""
    body = model.model
    body.trace = Trace(len(body.layers))
    try:
        yield body.trace
    finally:
        body.trace = None


@torch.no_grad()
def logit_lens(model: Phi3ForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """What each layer would predict if it were the last: head(final_norm(residual after layer i)).

    Returns logits (num_layers, B, T, V) in fp32; the last row equals the model's own logits.
    """
    with trace(model) as t:
        model.model(input_ids)
    residuals = torch.stack([layer["residual"] for layer in t.layers])  # (L, B, T, H)
    return model.lm_head(model.model.norm(residuals)).float()  # (L, B, T, V)


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
    tolerance = default_tolerance(model.lm_head.weight.dtype) if tolerance is None else tolerance
    theirs, handles = {}, []
    for name, module_name in _expand(HF_HOOKS, len(model.model.layers)).items():
        def keep(module, args, output, name=name):
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
        max_abs = (a - b).abs().max().item()
        rel = max_abs / max(b.abs().max().item(), 1e-30)
        ok = rel <= tolerance
        rows.append(dict(name=name, shape=tuple(a.shape), max_abs=max_abs, rel=rel, ok=ok,
                         first_bad=not ok and not seen_bad))
        seen_bad = seen_bad or not ok
    return rows


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
    lines.append(f"{len(rows)} tensors compared, tolerance {tolerance:g} (relative to each tensor's largest value): "
                 + (f"{len(bad)} above, first {bad[0]['name']}" if bad else "all within"))
    return "\n".join(lines)
