"""The Phi-3 family as data: the six published configs, known by their Hugging Face repo ids.

    microsoft/Phi-3-mini-4k-instruct     3.8B, sliding window 2047
    microsoft/Phi-3-mini-128k-instruct   3.8B, LongRoPE
    microsoft/Phi-3-medium-4k-instruct   14B, GQA (40 query heads over 10 kv heads)
    microsoft/Phi-3.5-mini-instruct      3.8B, LongRoPE
    microsoft/Phi-4-mini-instruct        3.8B, LongRoPE, GQA, partial rotary 0.75, tied embeddings
    microsoft/phi-4                      14B, GQA, rope theta 250000, no sliding window

data/family.json holds, for each model, transcribed from the published files:
- the config.json fields this project reads, in the official on-disk format (see config.py).
- its stop ids from generation_config.json.
  phi-4 publishes no list: its stop id is config.json's eos.
  Phi-4-mini's list is [200020, 199999], <|end|> and <|endoftext|>.

With it, a model's shape is known without a download:
- `phi3-scratch arch` prints Phi-3-mini's module tree and sizes offline.
- the benchmark builds random weights of a real shape.
- the tests scale each config down into a parity checkpoint.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from .config import Phi3Config
from .errors import Phi3Error

FAMILY_FILE = Path(__file__).parent / "data" / "family.json"


@cache
def _family() -> dict:
    return json.loads(FAMILY_FILE.read_text(encoding="utf-8"))


def repo_ids() -> list[str]:
    """The six repo ids, in the order listed above (family.json's)."""
    return list(_family())


def find(name: str) -> str | None:
    """The repo id that `name` means, or None.

    `name` is a repo id ('microsoft/phi-4', any case) or its last part ('phi-4').
    """
    for repo_id in _family():
        if name.lower() in (repo_id.lower(), repo_id.split("/")[1].lower()):
            return repo_id
    return None


def official_config(name: str) -> dict:
    """config.json of a family member as Microsoft publishes it (the fields this project reads)."""
    repo_id = find(name)
    if repo_id is None:
        raise Phi3Error(f"{name!r} is not a known Phi-3 family model; expected one of {repo_ids()}")
    return json.loads(json.dumps(_family()[repo_id]["config"]))  # a deep copy: callers may edit it


def config(name: str) -> Phi3Config:
    """The Phi3Config of a family member, with the stop ids of its generation_config.json."""
    repo_id = find(name)
    c = Phi3Config.from_dict(official_config(name), source=f"{FAMILY_FILE.name}: {repo_id}")
    c.stop_token_ids = _family()[repo_id]["stop_token_ids"] or c.stop_token_ids
    return c
