"""Phi3Config: the numbers that fix a Phi-3 model's shape, read from a checkpoint's config.json.

Two on-disk formats exist and both are read here:

- official (what Microsoft publishes): top-level `rope_theta`, `rope_scaling` (null, or
  {"type": "longrope" | "su", "short_factor": [...], "long_factor": [...]}) and, for Phi-4-mini,
  top-level `partial_rotary_factor`;
- transformers 5 (what `save_pretrained` writes today): `rope_parameters` holding `rope_type`,
  `rope_theta`, `partial_rotary_factor` and the factor lists.

Stop tokens come from generation_config.json when the folder has one (Phi-3 stops at
<|endoftext|>, <|assistant|> and <|end|>), else from config.json's `eos_token_id`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Phi3Error, is_integer, is_number

QUANTIZATIONS = ("int8", "int4")  # config.json's "quantization": quantize.py implements each
# Keys in generation_config.json.
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p")

ROPE_TYPES = ("default", "longrope")
# Older 128k checkpoints say "su"; transformers' Phi3Config maps "yarn" to longrope too (in Phi-3
# checkpoints it never meant YaRN's own formula).
ROPE_ALIASES = {"su": "longrope", "yarn": "longrope"}


@dataclass
class Phi3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    original_max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" or "longrope"
    rope_short_factor: list[float] | None = None  # longrope only: rotary_dim // 2 numbers each
    rope_long_factor: list[float] | None = None
    rope_attention_factor: float | None = None  # longrope: None means sqrt(1 + ln s / ln original)
    rope_factor: float | None = None  # longrope: s; None means max / original_max positions
    partial_rotary_factor: float = 1.0  # the fraction of each head that is rotated
    sliding_window: int | None = None  # each query sees this many keys, itself included
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    stop_token_ids: list[int] | None = None  # what generate() stops at; None: eos_token_id's
    torch_dtype: str | None = None  # the weights' dtype as config.json names it ("bfloat16"), if it does
    quantization: str | None = None  # "int8" or "int4" for a checkpoint saved quantized (quantize.py)
    # generation_config.json's generate settings (GENERATION_KEYS): transformers' names layer starts
    # from them.
    generation_defaults: dict = field(default_factory=dict)
    source: str = "<in memory>"  # the file this config was read from, for error messages

    def __post_init__(self):
        self.rope_type = ROPE_ALIASES.get(self.rope_type, self.rope_type)
        self.validate()
        if self.stop_token_ids is None:
            self.stop_token_ids = _as_id_list(self.eos_token_id)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head get rotated (all of them unless partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head: 1 is plain multi-head attention, more is GQA."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def longrope_attention_factor(self) -> float:
        """LongRoPE's scale on cos and sin: sqrt(1 + ln(s) / ln(original_max)), s = max / original."""
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        s = self.rope_factor or self.max_position_embeddings / self.original_max_position_embeddings
        if s <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    def validate(self) -> None:
        where = f"config {self.source}"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "original_max_position_embeddings"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise Phi3Error(f"{where}: {name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "partial_rotary_factor"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise Phi3Error(f"{where}: {name} must be a positive number, got {value!r}")
        if self.rope_type not in ROPE_TYPES:
            raise Phi3Error(
                f"{where}: unknown rope type {self.rope_type!r}; expected one of "
                f"{list(ROPE_TYPES)} (or the aliases 'su' and 'yarn' for longrope)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise Phi3Error(
                f"{where}: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise Phi3Error(
                f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise Phi3Error(
                f"{where}: partial_rotary_factor {self.partial_rotary_factor} gives rotary_dim "
                f"{self.rotary_dim}; expected an even number in 2..head_dim={self.head_dim}"
            )
        if self.rope_type == "longrope":
            for name in ("rope_short_factor", "rope_long_factor"):
                factors = getattr(self, name)
                if factors is None or len(factors) != self.rotary_dim // 2:
                    raise Phi3Error(
                        f"{where}: longrope {name.removeprefix('rope_')} must have rotary_dim / 2 = "
                        f"{self.rotary_dim // 2} numbers, got "
                        f"{'none' if factors is None else len(factors)}"
                    )
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise Phi3Error(f"{where}: quantization must be null or {' or '.join(map(repr, QUANTIZATIONS))}, "
                            f"got {self.quantization!r}")
        if self.sliding_window is not None and not (is_integer(self.sliding_window) and
                                                    self.sliding_window >= 1):
            raise Phi3Error(f"{where}: sliding_window must be null or an integer >= 1, "
                            f"got {self.sliding_window!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise Phi3Error(f"{where}: tie_word_embeddings must be true or false, "
                            f"got {self.tie_word_embeddings!r}")
        for name in ("rope_short_factor", "rope_long_factor"):
            factors = getattr(self, name) or []
            if not all(is_number(f) and f > 0 for f in factors):
                raise Phi3Error(f"{where}: longrope {name.removeprefix('rope_')} must hold positive numbers, "
                                f"got {factors!r:.100}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and not _is_ids(value):
                raise Phi3Error(f"{where}: {name} must be null, a token id or a list of token ids, "
                                f"got {value!r:.100}")

    # ----------------------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Phi3Config":
        """Build a config from the contents of config.json, in either on-disk format."""
        if not isinstance(d, dict):
            raise Phi3Error(f"config {source}: expected a JSON object, got a JSON {type(d).__name__}")
        model_type = d.get("model_type")
        architectures = d.get("architectures") or []
        if model_type != "phi3" or (architectures and "Phi3ForCausalLM" not in architectures):
            raise Phi3Error(
                f"config {source}: expected model_type 'phi3' with architecture Phi3ForCausalLM, "
                f"got model_type {model_type!r} and architectures {architectures}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise Phi3Error(f"config {source}: expected hidden_act 'silu', got {d['hidden_act']!r}")

        # transformers 5 nests the rope settings in rope_parameters; the official format keeps
        # rope_theta at the top and puts the longrope factors in rope_scaling (null for default).
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            name = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
            raise Phi3Error(f"config {source}: {name} must be null or an object, got {rope!r:.100}")
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d["num_attention_heads"] if d.get("num_key_value_heads") is None
                else d["num_key_value_heads"],  # null means plain multi-head attention
                max_position_embeddings=d["max_position_embeddings"],
                original_max_position_embeddings=d.get(  # top level first, as transformers reads it
                    "original_max_position_embeddings",
                    rope.get("original_max_position_embeddings", d["max_position_embeddings"]),
                ),
                rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
                rope_type=rope_type,
                rope_short_factor=rope.get("short_factor"),
                rope_long_factor=rope.get("long_factor"),
                rope_attention_factor=rope.get("attention_factor"),
                rope_factor=rope.get("factor"),
                partial_rotary_factor=rope.get(
                    "partial_rotary_factor", d.get("partial_rotary_factor", 1.0)
                ),
                sliding_window=d.get("sliding_window"),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                torch_dtype=d.get("torch_dtype") or d.get("dtype"),  # official / transformers 5
                quantization=d.get("quantization"),
                source=source,
            )
        except KeyError as e:
            raise Phi3Error(f"config {source}: required field {e.args[0]!r} is missing") from None

    def to_dict(self) -> dict:
        """config.json in the official on-disk format: from_dict(to_dict()) gives this config back, but for
        stop_token_ids (save_pretrained writes them to generation_config.json) and source."""
        d = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu"}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "original_max_position_embeddings", "rms_norm_eps", "rope_theta",
                     "partial_rotary_factor", "sliding_window", "tie_word_embeddings", "bos_token_id",
                     "eos_token_id", "pad_token_id", "torch_dtype", "quantization"):
            d[name] = getattr(self, name)
        d["rope_scaling"] = None
        if self.rope_type == "longrope":
            d["rope_scaling"] = {"type": "longrope", "short_factor": self.rope_short_factor,
                                 "long_factor": self.rope_long_factor}
            for key, value in (("attention_factor", self.rope_attention_factor),
                               ("factor", self.rope_factor)):
                if value is not None:
                    d["rope_scaling"][key] = value
        return d

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Phi3Config":
        """Read `folder/config.json`, and the stop ids of `folder/generation_config.json` if present."""
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise Phi3Error(f"{path} not found: a Phi-3 checkpoint folder must contain config.json")
        config = cls.from_dict(read_json(path), source=str(path))
        generation = folder / "generation_config.json"
        settings = read_json(generation, {})
        stop_ids = settings.get("eos_token_id")
        if stop_ids is not None and not _is_ids(stop_ids):
            raise Phi3Error(f"{generation}: eos_token_id must be a token id or a list of token ids, "
                            f"got {stop_ids!r:.100}")
        if _as_id_list(stop_ids):
            config.stop_token_ids = _as_id_list(stop_ids)
        config.generation_defaults = {k: settings[k] for k in GENERATION_KEYS if settings.get(k) is not None}
        return config


def _is_ids(value) -> bool:
    """A token id (an integer >= 0) or a list of them, as config.json and generation_config.json give ids."""
    is_id = lambda i: is_integer(i) and i >= 0
    return is_id(value) or isinstance(value, list) and all(map(is_id, value))


def _as_id_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def read_json(path: Path, default: dict | None = None) -> dict:
    """The JSON object in `path`; `default` when the file is absent (without one, absence is an error)."""
    if not path.is_file():
        if default is not None:
            return default
        raise Phi3Error(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Phi3Error(f"{path} is not valid JSON ({e}); expected a JSON object") from None
    if not isinstance(data, dict):
        raise Phi3Error(f"{path} holds a JSON {type(data).__name__}; expected a JSON object")
    return data
