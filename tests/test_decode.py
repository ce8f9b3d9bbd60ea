"""greedy_decode, the reference loop: short, unchecked inside, and the same tokens as generate."""

import ast
import inspect
import textwrap

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch import checks, decode

from .conftest import FAMILY, SMALL_ORIGINAL_MAX, model_params


@pytest.mark.parametrize("name", model_params(*FAMILY))
def test_greedy_decode_gives_the_tokens_of_generate_without_stop_ids(checkpoints, name):
    folder, _ = checkpoints(name)
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    torch.manual_seed(5)
    ids = torch.randint(3, 256, (2, 7))
    # one cache: see below
    new = min(30, SMALL_ORIGINAL_MAX - 7) if model.config.rope_type == "longrope" else 30
    assert torch.equal(p3.greedy_decode(model, ids, new), p3.generate(model, ids, new, eos_token_id=[]))


def test_greedy_decode_on_the_tiny_model_never_stops_early():
    model, tokenizer = p3.Phi3ForCausalLM.from_pretrained("tiny"), p3.Tokenizer.from_pretrained("tiny")
    ids = torch.tensor([tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "What is RoPE?"}]))])
    out = p3.greedy_decode(model, ids, 120)
    assert out.shape == (1, ids.shape[1] + 120) and torch.equal(out[:, : ids.shape[1]], ids)
    assert set(out[0, ids.shape[1]:].tolist()) & set(model.config.stop_token_ids)  # it went on past a stop id
    assert torch.equal(out, p3.generate(model, ids, 120, eos_token_id=[]))


def test_greedy_decode_checks_once_and_its_model_calls_skip_the_checks(monkeypatch):
    model = p3.Phi3ForCausalLM.from_pretrained("tiny")
    calls = []
    monkeypatch.setattr("phi3_scratch.model.check_inputs", lambda *a: calls.append(a))
    p3.greedy_decode(model, torch.tensor([[1, 400, 37]]), 5)
    assert calls == []  # 5 forward passes, none of them checked
    with pytest.raises(p3.Phi3Error, match="token id 99999 is outside the vocabulary"):
        p3.greedy_decode(model, torch.tensor([[1, 99999]]), 5)  # checked at the edge instead
    with pytest.raises(p3.Phi3Error, match="max_new_tokens must be a positive integer, got 0"):
        p3.greedy_decode(model, torch.tensor([[1, 2]]), 0)


def test_greedy_decode_fits_in_25_lines_and_has_no_options():
    function = ast.parse(textwrap.dedent(inspect.getsource(decode.greedy_decode))).body[0]
    body = function.body[1:]  # after the docstring
    assert body[-1].end_lineno - body[0].lineno + 1 <= 25
    assert [a.arg for a in function.args.args] == ["model", "input_ids", "max_new_tokens"]


def test_greedy_decode_refuses_to_pass_the_longrope_switch_with_one_cache(checkpoints):
    """Past the original context every cached key must be rotated again: generate starts over there."""
    folder, _ = checkpoints("Phi-3-mini-128k-instruct")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (1, SMALL_ORIGINAL_MAX))
    with pytest.raises(p3.Phi3Error, match="pass LongRoPE's original context .* use generate"):
        p3.greedy_decode(model, ids, 2)
    # up to the switch: fine
    assert checks.check_greedy_decode(model.config, ids, 1, torch.device("cpu")) is None
