"""Draw docs/img/architecture.svg: the path of a token from id to logits, with the shape at every step.

    python scripts/draw_architecture.py            # rewrite docs/img/architecture.svg
    python scripts/draw_architecture.py --check    # exit 1 if the file differs from what the code gives now

The shapes are not typed in: Phi-3-mini's model is built on the meta device (shapes, no weights),
run once on a prompt of T tokens, and every shape drawn is one that forward pass produced
(forward hooks on the modules, and p3.trace for q, k, v and the attention probabilities).
tests/test_architecture.py holds the committed picture equal to what this script draws.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

import torch

import phi3_scratch as p3
from phi3_scratch import family

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "architecture.svg"
REPO_ID = "microsoft/Phi-3-mini-4k-instruct"
T = 7  # the prompt length the meta forward runs; drawn as "T" (no dimension of Phi-3-mini is 7)


def shapes(repo_id: str = REPO_ID) -> dict[str, tuple[int, ...]]:
    """What one forward pass produces at each step, from the model itself (on the meta device)."""
    config = family.config(repo_id)
    found = {}
    with torch.device("meta"):
        model = p3.Phi3ForCausalLM(config)
        layer = model.model.layers[0]
        watched = {"embed": model.model.embed_tokens, "input_norm": layer.input_layernorm,
                   "qkv": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
                   "post_norm": layer.post_attention_layernorm, "gate_up": layer.mlp.gate_up_proj,
                   "down": layer.mlp.down_proj, "norm": model.model.norm, "logits": model.lm_head}
        for name, module in watched.items():
            def hook(module, inputs, output, name=name):
                found[name] = tuple(output.shape)
                found[name + "_in"] = tuple(inputs[0].shape)
            module.register_forward_hook(hook)
        with p3.trace(model) as t:
            model(torch.zeros(1, T, dtype=torch.long), check=False)
    for name in ("layers.0.q", "layers.0.k", "layers.0.v", "layers.0.attn_probs"):
        found[name.split(".")[-1]] = tuple(t[name].shape)
    found["ids"] = (1, T)
    return found


def shape_text(shape: tuple[int, ...]) -> str:
    """(1, T, 3072): the prompt's length written T."""
    return "(" + ", ".join("T" if d == T else str(d) for d in shape) + ")"


def architecture_svg(repo_id: str = REPO_ID) -> str:
    """The picture, as SVG text."""
    s, c = shapes(repo_id), family.config(repo_id)
    hd, nH, nKV = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    steps = [  # (kind, label, detail, shape after it)
        ("io", "token ids", "the prompt, from the tokenizer", s["ids"]),
        ("op", "embed_tokens", f"one row of {c.vocab_size} x {c.hidden_size} per id", s["embed"]),
        ("layer", f"decoder layer, x {c.num_hidden_layers}", "", None),
        ("op", "input_layernorm", "RMSNorm: x / rms(x), in fp32, cast back, then x weight", s["input_norm"]),
        ("op", "qkv_proj", f"one matmul, {s['qkv_in'][-1]} -> {s['qkv'][-1]}: q | k | v", s["qkv"]),
        ("op", "q, k, v", f"split into {nH} query heads and {nKV} kv heads of {hd}",
         (s["q"], s["k"], s["v"])),
        ("op", "rotary", f"rotate-half on q and k, by position (theta {c.rope_theta:g})", s["q"]),
        ("op", "KV cache", "k and v kept per layer; a new token computes only its own", s["k"]),
        ("op", "attention", f"softmax(q k^T / sqrt({hd}) + mask) v; window {c.sliding_window}",
         s["attn_probs"]),
        ("op", "o_proj", f"heads joined, {s['o_proj_in'][-1]} -> {s['o_proj'][-1]}", s["o_proj"]),
        ("add", "+ residual", "h = h + attention", s["o_proj"]),
        ("op", "post_attention_layernorm", "RMSNorm", s["post_norm"]),
        ("op", "gate_up_proj", f"one matmul, {s['gate_up_in'][-1]} -> {s['gate_up'][-1]}: gate | up",
         s["gate_up"]),
        ("op", "silu(gate) * up", "the SiLU-gated MLP", s["down_in"]),
        ("op", "down_proj", f"{s['down_in'][-1]} -> {s['down'][-1]}", s["down"]),
        ("add", "+ residual", "h = h + mlp", s["down"]),
        ("end", "", "", None),
        ("op", "norm", "the final RMSNorm", s["norm"]),
        ("io", "lm_head", f"{c.hidden_size} -> {c.vocab_size}: a logit per word; argmax is the next token",
         s["logits"]),
    ]
    width, box_w, box_h, gap, left = 760, 400, 44, 18, 40
    y, parts, layer_top = 70, [], None
    colours = {"io": "#dbeafe", "op": "#f1f5f9", "add": "#fef3c7"}
    for kind, label, detail, shape in steps:
        if kind == "layer":
            layer_top = y
            parts.append(f'<text x="{left + 16}" y="{y + 16}" class="layer">{html.escape(label)}</text>')
            y += 28
            continue
        if kind == "end":
            parts.insert(0, f'<rect x="{left}" y="{layer_top - 6}" width="{width - 2 * left}" '
                            f'height="{y - layer_top}" rx="10" class="frame"/>')
            parts.pop()  # the last box's arrow goes on through the frame, to the next box
            middle = left + 30 + box_w / 2
            parts.append(f'<line x1="{middle}" y1="{y - gap}" x2="{middle}" y2="{y + gap}" class="arrow"/>')
            y += gap
            continue
        x = left + 30
        parts.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="{colours[kind]}" '
                     f'class="box"/>')
        parts.append(f'<text x="{x + 12}" y="{y + 18}" class="name">{html.escape(label)}</text>')
        parts.append(f'<text x="{x + 12}" y="{y + 35}" class="detail">{html.escape(detail)}</text>')
        if isinstance(shape[0], tuple):  # q, k, v
            shown = shape_text(shape[0]) + " each" if len(set(shape)) == 1 else \
                "q " + shape_text(shape[0]) + ", k and v " + shape_text(shape[1])
        else:
            shown = shape_text(shape)
        parts.append(f'<text x="{x + box_w + 14}" y="{y + 27}" class="shape">{html.escape(shown)}</text>')
        if kind != "io" or label == "token ids":
            parts.append(f'<line x1="{x + box_w / 2}" y1="{y + box_h}" x2="{x + box_w / 2}" '
                         f'y2="{y + box_h + gap}" class="arrow"/>')
        y += box_h + gap
    title = f"{repo_id.split('/')[1]}: one token's path from id to logits (shapes for a prompt of T tokens)"
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" '
        f'viewBox="0 0 {width} {y + 10}" font-family="sans-serif">',
        "<style>.name{font-size:14px;font-weight:bold;fill:#0f172a}.detail{font-size:11px;fill:#475569}"
        ".shape{font-size:12px;font-family:monospace;fill:#1d4ed8}.layer{font-size:13px;fill:#334155}"
        ".box{stroke:#94a3b8}.frame{fill:none;stroke:#64748b;stroke-dasharray:6 4}"
        ".arrow{stroke:#64748b;stroke-width:1.5;marker-end:url(#head)}.title{font-size:15px;fill:#0f172a}</style>",
        '<defs><marker id="head" markerWidth="8" markerHeight="8" refX="4" refY="8">'
        '<path d="M0,0 L8,0 L4,8 z" fill="#64748b"/></marker></defs>',
        f'<text x="{left}" y="36" class="title">{html.escape(title)}</text>',
        *parts,
        "</svg>",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if the file is stale")
    args = parser.parse_args(argv)
    svg = architecture_svg()
    if args.check:
        stale = not OUT.is_file() or OUT.read_text() != svg
        verdict = "stale (python scripts/draw_architecture.py rewrites it)" if stale else "ok"
        print(f"{OUT.relative_to(ROOT)}: {verdict}")
        return int(stale)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(svg)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
