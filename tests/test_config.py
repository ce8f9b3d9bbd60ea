"""Phi3Config reads the six published configs (official format) and transformers 5's format.

The configs come from the package's family data (phi3_scratch/data/family.json); where the
development fixtures are present, one test checks that data against the published files.
"""

import dataclasses
import json

import pytest

import phi3_scratch as p3

from phi3_scratch import family

from .conftest import CONFIGS, FAMILY, needs_fixture, real_config

# name: (head_dim, kv_groups, rope_type, rotary_dim, sliding_window, tied)
EXPECTED = {
    "Phi-3-mini-4k-instruct": (96, 1, "default", 96, 2047, False),
    "Phi-3-mini-128k-instruct": (96, 1, "longrope", 96, 262144, False),
    "Phi-3-medium-4k-instruct": (128, 4, "default", 128, 2047, False),
    "Phi-3.5-mini-instruct": (96, 1, "longrope", 96, 262144, False),
    "Phi-4-mini-instruct": (128, 3, "longrope", 96, 262144, True),
    "phi-4": (128, 4, "default", 128, None, False),
}


# Stop tokens: generation_config.json's eos_token_id lists, where a model publishes one. Phi-3 and
# Phi-3.5 stop at <|endoftext|>, <|assistant|> and <|end|>; Phi-4-mini at <|end|> and <|endoftext|>
# (its config.json names only the second); phi-4 at config.json's eos.
PUBLISHED_STOPS = {name: [32000, 32001, 32007] for name in FAMILY if name.startswith("Phi-3")}
PUBLISHED_STOPS["Phi-4-mini-instruct"] = [200020, 199999]


@pytest.mark.parametrize("name", FAMILY)
def test_published_configs_load(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(real_config(name)))  # as config.json on disk
    config = p3.Phi3Config.from_pretrained(tmp_path)
    got = (config.head_dim, config.kv_groups, config.rope_type, config.rotary_dim, config.sliding_window,
           config.tie_word_embeddings)
    assert got == EXPECTED[name]
    assert config.stop_token_ids == [real_config(name)["eos_token_id"]]  # config.json alone: its eos only
    stops = family.config(name).stop_token_ids  # with generation_config.json's list, where it has one
    assert stops == PUBLISHED_STOPS.get(name, [real_config(name)["eos_token_id"]])
    if name == "phi-4":
        assert config.rope_theta == 250000.0


def test_family_knows_repo_ids_and_short_names():
    assert family.repo_ids() == [f"microsoft/{name}" for name in FAMILY]
    assert family.find("microsoft/Phi-3-mini-4k-instruct") == family.find("phi-3-MINI-4k-instruct")
    assert family.find("microsoft/phi-5") is None
    with pytest.raises(p3.Phi3Error,
                       match=r"'phi-5' is not a known Phi-3 family model; expected one of \['microsoft/"):
        family.official_config("phi-5")


@needs_fixture(CONFIGS)
def test_family_data_equals_the_published_config_files():
    """Every field family.json carries, and the stop ids, as in the published config files."""
    for name in FAMILY:
        published = json.loads((CONFIGS / name / "config.json").read_text())
        ours = real_config(name)
        assert ours == {key: published[key] for key in ours}, name
        generation = CONFIGS / name / "generation_config.json"  # the fixtures have it for Phi-3 and 3.5 only
        if generation.is_file():
            assert (family.config(name).stop_token_ids
                    == json.loads(generation.read_text())["eos_token_id"]), name
        assert published["eos_token_id"] in family.config(name).stop_token_ids, name


def official_to_transformers5(d: dict) -> dict:
    d = dict(d)
    scaling = d.pop("rope_scaling") or {}
    rope = {"rope_type": scaling.get("type", "default"), "rope_theta": d.pop("rope_theta"),
            "partial_rotary_factor": d.pop("partial_rotary_factor", 1.0)}
    if scaling:
        rope.update(short_factor=scaling["short_factor"], long_factor=scaling["long_factor"],
                    original_max_position_embeddings=d["original_max_position_embeddings"])
    d["rope_parameters"] = rope
    return d


@pytest.mark.parametrize("name", FAMILY)
def test_both_on_disk_formats_give_the_same_config(name):
    official = p3.Phi3Config.from_dict(real_config(name))
    newer = p3.Phi3Config.from_dict(official_to_transformers5(real_config(name)))
    assert dataclasses.replace(newer, source="") == dataclasses.replace(official, source="")


def test_su_is_an_alias_of_longrope():
    d = real_config("Phi-3-mini-128k-instruct")
    d["rope_scaling"]["type"] = "su"
    assert p3.Phi3Config.from_dict(d).rope_type == "longrope"


def test_config_errors_name_the_problem(tmp_path):
    d = real_config("Phi-3-mini-128k-instruct")
    with pytest.raises(p3.Phi3Error,
                       match=r"unknown rope type 'dynamic'; expected one of \['default', 'longrope'\]"):
        p3.Phi3Config.from_dict({**d, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(p3.Phi3Error,
                       match=r"expected model_type 'phi3' .* got model_type 'llama' and architectures "
                             r"\['LlamaForCausalLM'\]"):
        p3.Phi3Config.from_dict({**d, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    short = {**d, "rope_scaling": {**d["rope_scaling"], "short_factor": [1.0] * 47}}
    with pytest.raises(p3.Phi3Error, match="short_factor must have rotary_dim / 2 = 48 numbers, got 47"):
        p3.Phi3Config.from_dict(short)
    missing = {k: v for k, v in d.items() if k != "hidden_size"}
    (tmp_path / "config.json").write_text(json.dumps(missing))
    with pytest.raises(p3.Phi3Error,
                       match=f"config {tmp_path / 'config.json'}: required field 'hidden_size' is missing"):
        p3.Phi3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(p3.Phi3Error, match="config.json is not valid JSON"):
        p3.Phi3Config.from_pretrained(tmp_path)


def test_a_config_built_in_code_stops_at_its_eos():
    """Stop tokens: without a generation_config.json list, generation stops at config.json's eos."""
    config = p3.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                           original_max_position_embeddings=16, eos_token_id=5)
    assert config.stop_token_ids == [5]
    assert dataclasses.replace(config, stop_token_ids=[5, 7]).stop_token_ids == [5, 7]


def test_a_saved_model_says_the_dtype_it_was_saved_in(tmp_path):
    model = p3.Phi3ForCausalLM.from_pretrained("tiny", dtype="bf16")  # the tiny model ships in float32
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
