"""docs/img/architecture.svg, the README's picture, is what scripts/draw_architecture.py draws now."""

import importlib.util
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from phi3_scratch import family

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "draw_architecture.py"
spec = importlib.util.spec_from_file_location("draw_architecture", SCRIPT)
draw = sys.modules["draw_architecture"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(draw)


def test_the_committed_picture_is_what_the_script_draws():
    assert draw.OUT.read_text() == draw.architecture_svg(), \
        "docs/img/architecture.svg is stale: python scripts/draw_architecture.py rewrites it"


def test_the_picture_shows_phi3_minis_shapes_from_its_config():
    c = family.config(draw.REPO_ID)
    texts = [t.text for t in ET.fromstring(draw.OUT.read_text()).iter("{http://www.w3.org/2000/svg}text")]
    H, inner, V, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd
    heads = c.num_attention_heads
    expected = ["(1, T)", f"(1, T, {H})", f"(1, T, {qkv})", f"(1, {heads}, T, {hd}) each",
                f"(1, {heads}, T, T)",
                f"(1, T, {2 * inner})", f"(1, T, {inner})", f"(1, T, {V})"]
    assert [e for e in expected if e not in texts] == []
    assert f"decoder layer, x {c.num_hidden_layers}" in texts
    order = ["token ids", "embed_tokens", "input_layernorm", "qkv_proj", "rotary", "attention", "o_proj",
             "post_attention_layernorm", "gate_up_proj", "down_proj", "norm", "lm_head"]
    assert [texts.index(n) for n in order] == sorted(texts.index(n) for n in order)  # the forward's order
