"""Shared test helpers: tiny random-weight Phi-3 checkpoints made with transformers.

Each of the six real configs (phi3_scratch/data/family.json, see phi3_scratch/family.py) is scaled
down (2 layers, head_dim 16, vocabulary 256) keeping what makes it different: its query/kv head
ratio, partial rotary, tied embeddings, LongRoPE (with original_max 32, so a short test crosses
the switch) and its sliding window (8 where the real model has one small enough to matter, 2047).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from phi3_scratch import family

FIXTURES = Path(os.environ.get("PHI3_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
CONFIGS = FIXTURES / "configs"
FAMILY = [
    "Phi-3-mini-4k-instruct",
    "Phi-3-mini-128k-instruct",
    "Phi-3-medium-4k-instruct",
    "Phi-3.5-mini-instruct",
    "Phi-4-mini-instruct",
    "phi-4",
]
SMALL_WINDOW = 8
ROOT = Path(__file__).resolve().parents[1]


def train_tiny():
    """scripts/train_tiny.py as a module: its corpus reader and its tokenizer.json builder."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_tiny
    finally:
        sys.path.pop(0)
    return train_tiny


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from torch's seed 0: random prompts do not depend on which tests ran before
    (a near-tie in a random-weight model could otherwise flip an argmax under another selection)."""
    torch.manual_seed(0)
SMALL_ORIGINAL_MAX = 32


# Two made-up configs, smaller still and quick to check: one with a sliding window (like
# Phi-3-mini-4k), one with LongRoPE + GQA + partial rotary + tied embeddings (like Phi-4-mini, with
# invented factor curves).
_TINY = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=256, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
INLINE = {
    "tiny-window": {**_TINY, "max_position_embeddings": 64, "original_max_position_embeddings": 64,
                    "sliding_window": SMALL_WINDOW},
    "tiny-longrope": {**_TINY, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
                      "partial_rotary_factor": 0.75, "tie_word_embeddings": True, "sliding_window": None,
                      "max_position_embeddings": 4 * SMALL_ORIGINAL_MAX,
                      "original_max_position_embeddings": SMALL_ORIGINAL_MAX,
                      "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0, 1.1, 1.3, 1.6, 2.0],
                                       "long_factor": [1.0, 1.5, 3.0, 8.0, 20.0, 40.0]}},
}


def needs_fixture(path: Path):
    return pytest.mark.skipif(not path.exists(),
                              reason=f"fixture {path} is absent "
                                     "(it ships in the dev workspace's shared/fixtures)")


def real_config(name: str) -> dict:
    """The published config.json of a family member (the fields this project reads)."""
    return family.official_config(name)


def scaled_config(name: str) -> dict:
    """The real config of `name`, shrunk to a CPU-sized model with the same peculiarities."""
    if name in INLINE:
        return dict(INLINE[name])
    real = real_config(name)
    ratio = real["num_attention_heads"] // real["num_key_value_heads"]
    kv_heads = 2 if ratio > 1 else 4
    heads, head_dim = kv_heads * ratio, 16
    small = dict(real)
    small.update(
        vocab_size=256, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    scaling = real.get("rope_scaling")
    if scaling:  # LongRoPE: keep the real factor curves, sampled down to rotary_dim / 2 numbers
        n = int(head_dim * real.get("partial_rotary_factor", 1.0)) // 2
        pick = [round(i * (len(scaling["short_factor"]) - 1) / (n - 1)) for i in range(n)]
        small["rope_scaling"] = {
            "type": scaling["type"],
            "short_factor": [scaling["short_factor"][i] for i in pick],
            "long_factor": [scaling["long_factor"][i] for i in pick],
        }
        small.update(original_max_position_embeddings=SMALL_ORIGINAL_MAX,
                     max_position_embeddings=4 * SMALL_ORIGINAL_MAX)
    else:
        small.update(original_max_position_embeddings=64, max_position_embeddings=64)
    if real["sliding_window"] is not None and real["sliding_window"] < real["max_position_embeddings"]:
        small["sliding_window"] = SMALL_WINDOW
    return small


def hf_model_from_official(config_dict: dict, seed: int = 0):
    """A transformers Phi3ForCausalLM with weights large enough that logits are O(1)."""
    import transformers

    cfg = {k: v for k, v in config_dict.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = transformers.Phi3Config(**cfg)
    # Its own random stream: the test that happens to build a checkpoint first must draw the same
    # prompts as it does when the checkpoint was already built (the session-wide fixture below).
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        model = transformers.Phi3ForCausalLM(config).eval()
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights: around 1
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 1)
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
    model.config._attn_implementation = "eager"
    return model


def to_official_format(folder: Path, alias: str | None = None) -> None:
    """Rewrite a transformers-5 config.json in the official on-disk format (rope_theta + rope_scaling)."""
    path = folder / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope["rope_theta"]
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        d["partial_rotary_factor"] = rope["partial_rotary_factor"]
    d["rope_scaling"] = None
    if rope["rope_type"] == "longrope":
        d["rope_scaling"] = {"type": alias or "longrope", "short_factor": rope["short_factor"],
                             "long_factor": rope["long_factor"]}
    d["torch_dtype"] = d.pop("dtype", "float32")
    path.write_text(json.dumps(d, indent=2))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(name, fmt) -> (folder, transformers model): saved sharded, made once per session."""
    made: dict = {}

    def get(name: str, fmt: str = "transformers"):
        key = (name, fmt)
        if key not in made:
            hf = hf_model_from_official(scaled_config(name))
            folder = tmp_path_factory.mktemp(f"{name}-{fmt}")
            hf.save_pretrained(folder, max_shard_size="100KB")
            assert (folder / "model.safetensors.index.json").is_file(), "expected a sharded checkpoint"
            if fmt != "transformers":
                to_official_format(folder, alias="su" if fmt == "official-su" else None)
            made[key] = (folder, hf)
        return made[key]

    return get


_REPORT: list[str] = []


@pytest.fixture
def report():
    """report(line): a figure worth reading (parity differences, memory) printed after the run."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("phi3_scratch figures")
        for line in _REPORT:
            terminalreporter.write_line(line)


def model_params(*names: str) -> list:
    """pytest parameters for model names (a family member's or one of INLINE)."""
    return [pytest.param(n) for n in names]
