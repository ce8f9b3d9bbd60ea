"""p3.explore: one forward pass, drawn in the browser: attention, the logit lens, and Phi-3's own mechanics.

    view = p3.explore(model, tokenizer, "The KV cache")
    view.save("view.html")     # one self-contained file: script, style and data inline, nothing fetched
    view                       # in Jupyter, the same view inline (_repr_html_)

What the view holds (explore_data computes it, every number from the model itself):
- the prompt's tokens, ids, and which ones the chat template wrote;
- attention probabilities per layer and head, with the sliding-window band;
- the logit lens (each layer's top token at each position) and the next token's top candidates;
- the residual stream's norm after the embedding and after each layer;
- which query heads share a kv head, rotary's share of head_dim, the LongRoPE factors in use;
- the KV cache filling up over a few greedy steps.
The page itself is data/explore.html: plain JavaScript and SVG, no library. serve.py serves it live.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

import torch

from .errors import Phi3Error, is_integer
from .generation import as_causal_lm
from .stepping import Stepper
from .tracing import lens_logits, trace

MAX_TOKENS = 128  # attention maps grow as layers x heads x T^2: a view is for reading, not for a book
TOP = 10  # candidates shown for the next token


def explore_data(model, tokenizer, prompt: str, chat: bool = False, steps: int = 6, name: str = "") -> dict:
    """Everything the view shows, as plain numbers and strings (JSON-ready)."""
    model = as_causal_lm(model, "explore(model, tokenizer, prompt)")
    if not hasattr(tokenizer, "id_to_piece"):
        raise Phi3Error(f"explore: tokenizer must be a p3.Tokenizer, got {type(tokenizer).__name__}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Phi3Error(f"explore: the prompt must be some text, got {prompt!r:.40}")
    if not is_integer(steps) or not 1 <= steps <= 32:
        raise Phi3Error(f"explore: steps must be an integer in 1..32, got {steps!r}")
    c = model.config
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tokenizer.encode(text)
    limit = min(MAX_TOKENS, c.max_position_embeddings - steps)
    if not ids or len(ids) > limit:
        raise Phi3Error(f"explore: the prompt is {len(ids)} tokens; a view takes 1..{limit} "
                        f"(attention is drawn for every pair of tokens)")
    device = model.lm_head.weight.device
    x = torch.tensor([ids], device=device)  # (1, T)
    with torch.no_grad(), trace(model) as t:
        logits = model(x)[0, -1].float()  # (V,)
    L, T = c.num_hidden_layers, len(ids)
    piece = lambda i: tokenizer.id_to_piece(i)
    residuals = torch.stack([layer["residual"][0] for layer in t.layers])  # (L, T, H)
    with torch.no_grad():
        lens = lens_logits(model, residuals).softmax(-1)  # (L, T, V)
    best = lens.max(-1)  # (L, T): each layer's top token at each position
    probs = logits.softmax(-1)
    top = probs.topk(min(TOP, probs.numel()))
    # (L + 1, T)
    norms = torch.cat([t["embed"][0].float().norm(dim=-1)[None], residuals.float().norm(dim=-1)])
    rope = "default" if c.rope_type != "longrope" else ("long" if T > c.original_max_position_embeddings
                                                          else "short")
    factors = {"short": c.rope_short_factor, "long": c.rope_long_factor}.get(rope)
    return {
        "model": name or Path(c.source).parent.name, "prompt": prompt, "chat": chat,
        "tokens": [{"id": i, "piece": piece(i),
                    "special": tokenizer.decode([i], skip_special_tokens=True) == ""
                    and tokenizer.decode([i]) != ""} for i in ids],
        "config": {"layers": L, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                   "head_dim": c.head_dim, "rotary_dim": c.rotary_dim, "hidden": c.hidden_size,
                   "sliding_window": c.sliding_window, "rope_type": c.rope_type,
                   "original_max": c.original_max_position_embeddings,
                   "max_positions": c.max_position_embeddings, "rope_theta": c.rope_theta},
        "gqa": [list(range(k * c.kv_groups, (k + 1) * c.kv_groups)) for k in range(c.num_key_value_heads)],
        "rope": {"in_use": rope, "factors": [round(f, 4) for f in factors] if factors else None},
        "attention": [[[[round(p, 4) for p in row] for row in head] for head in
                       t[f"layers.{i}.attn_probs"][0].float().tolist()] for i in range(L)],  # (L, nH, T, T)
        "lens": [[{"id": int(i), "piece": piece(int(i)), "prob": round(float(p), 4)}
                  for p, i in zip(best.values[layer].tolist(),
                                  best.indices[layer].tolist())] for layer in range(L)],
        "next": [{"id": int(i), "piece": piece(int(i)), "prob": float(p), "logit": float(logits[i])}
                 for p, i in zip(top.values.tolist(), top.indices.tolist())],
        "residual_norm": [[round(v, 3) for v in row] for row in norms.tolist()],
        "cache": cache_steps(model, x, steps, piece),
    }


def cache_steps(model, x: torch.Tensor, steps: int, piece) -> list[dict]:
    """A few greedy decode steps through one KV cache (a Stepper): what each adds, how full the cache is."""
    stepper = Stepper(model, x, max_new_tokens=steps)
    rows = [{"step": 0, "fed": x.shape[1], "length": stepper.record().cache_length,
             "max_len": stepper.cache.max_len, "token": None}]  # the prefill
    for step, record in enumerate(stepper, 1):  # each greedy choice, fed back through the cache
        rows.append({"step": step, "fed": 1, "length": record.cache_length, "max_len": stepper.cache.max_len,
                     "token": {"id": record.chosen, "piece": piece(record.chosen)}})
    return rows


class View:
    """The explore view: `_repr_html_` for Jupyter, `.save(path)` for a file, `.html` for both."""

    def __init__(self, data: dict):
        self.data = data
        self.html = page(data)

    def _repr_html_(self) -> str:
        # In an iframe of its own, its script and style stay apart from the notebook's.
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:900px;'
                f'border:1px solid #ccc" sandbox="allow-scripts"></iframe>')

    def save(self, path: str | Path) -> Path:
        """Write the self-contained HTML file; returns its path."""
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm"):
            raise Phi3Error("explore: the view is an HTML file: give a name ending in .html, got "
                            f"{str(path)!r}")
        if path.parent and not path.parent.is_dir():
            raise Phi3Error(f"explore: folder {path.parent} not found, for {path}")
        path.write_text(self.html, encoding="utf-8")
        return path


def explore(model, tokenizer, prompt: str, chat: bool = False, steps: int = 6, name: str = "") -> View:
    """The view of one forward pass of `prompt`; see this module's docstring."""
    return View(explore_data(model, tokenizer, prompt, chat, steps, name))


def page(data: dict, live: bool = False) -> str:
    """data/explore.html with the data (and, live, the server's form) inline."""
    template = resources.files("phi3_scratch").joinpath("data/explore.html").read_text(encoding="utf-8")
    # "</" inside the JSON would end the script element early: write it as the escape JSON allows.
    blob = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return template.replace("/*DATA*/null", blob).replace("/*LIVE*/false", "true" if live else "false")
