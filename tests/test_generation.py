"""Greedy generation: same tokens as transformers' generate, with and without the cache."""

import copy
import json
import shutil

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.loading import TINY

from .conftest import FAMILY, INLINE, SMALL_ORIGINAL_MAX, model_params


def hf_generate(hf, ids, new, eos, mask=None):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                           max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)


@pytest.mark.parametrize("name", model_params(*FAMILY, *INLINE))
def test_greedy_tokens_match_transformers_with_and_without_cache(checkpoints, name):
    folder, hf = checkpoints(name)
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (1, 6))
    expected = hf_generate(hf, ids, 24, eos=[])
    assert torch.equal(p3.generate(model, ids, 24, use_cache=True, eos_token_id=[]), expected)
    assert torch.equal(p3.generate(model, ids, 24, use_cache=False, eos_token_id=[]), expected)


@pytest.mark.parametrize("name", model_params("tiny-window", "tiny-longrope", "Phi-3-mini-4k-instruct",
                                              "Phi-3-medium-4k-instruct", "Phi-4-mini-instruct"))
def test_left_padded_batch_gives_each_row_its_own_tokens(checkpoints, name):
    folder, hf = checkpoints(name)
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    torch.manual_seed(4)
    prompts = [torch.randint(3, 256, (n,)) for n in (9, 4, 13)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batch = p3.generate(model, ids, 15, eos_token_id=[], attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = p3.generate(model, p[None], 15, eos_token_id=[])
        assert torch.equal(batch[row, width:], alone[0, len(p):]), f"row {row} differs from its own run"
    assert torch.equal(batch, hf_generate(hf, ids, 15, eos=[], mask=mask))
    assert torch.equal(p3.generate(model, ids, 15, use_cache=False, eos_token_id=[], attention_mask=mask),
                       batch)


@pytest.mark.parametrize("name", model_params("tiny-longrope", "Phi-3-mini-128k-instruct",
                                              "Phi-3.5-mini-instruct", "Phi-4-mini-instruct"))
def test_longrope_generation_across_the_switch_matches_transformers(checkpoints, name):
    """The prompt fits in original_max; generation grows past it and the cache is recomputed."""
    folder, hf = checkpoints(name)
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    torch.manual_seed(5)
    ids = torch.randint(3, 256, (1, SMALL_ORIGINAL_MAX - 4))
    expected = hf_generate(hf, ids, 12, eos=[])
    assert torch.equal(p3.generate(model, ids, 12, eos_token_id=[]), expected)
    assert torch.equal(p3.generate(model, ids, 12, use_cache=False, eos_token_id=[]), expected)


def test_longrope_switch_needs_cache_recompute(checkpoints):
    """Why generate() drops the cache at the switch: keys cached with the short factors are stale."""
    folder, _ = checkpoints("tiny-longrope")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (1, SMALL_ORIGINAL_MAX + 1))
    with torch.no_grad():
        full = model(ids)[0, -1]  # the whole sequence at once: long factors everywhere
        cache = model.new_cache(1, max_len=64)
        model(ids[:, :-1], cache)  # 32 positions: short factors
        stale = model(ids[:, -1:], cache)[0, -1]  # position 32 with long factors, keys with short
        cache.reset()
        fresh = model(ids, cache)[0, -1]  # what generate() does at the switch
    assert (stale - full).abs().max() > 1e-2
    assert (fresh - full).abs().max() < 1e-5


def test_stop_tokens_end_generation(checkpoints):
    folder, hf = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (1, 5))
    free = p3.generate(model, ids, 20, eos_token_id=[])  # [] disables stopping
    assert free.shape == (1, 25)
    stop = int(free[0, 5 + 6])  # make the 7th new token a stop token
    first = (free[0, 5:] == stop).nonzero()[0].item()
    stopped = p3.generate(model, ids, 20, eos_token_id=[123, stop])
    assert stopped.shape == (1, 5 + first + 1) and int(stopped[0, -1]) == stop
    assert torch.equal(stopped, hf_generate(hf, ids, 20, eos=[123, stop]))


def test_left_padding_positions_count_real_tokens(checkpoints):
    """Left padding: a row's positions start at its first real token (padding gets 0). RoPE sees only
    relative positions, so the token tests above would not notice positions counted in slots."""
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.randint(3, 256, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad(), p3.trace(model, only={"positions"}) as t:
        model(ids, attention_mask=mask)
    assert t["positions"].tolist() == [[0, 0, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5]]


def test_generate_stops_at_each_of_generation_configs_stop_ids(checkpoints, tmp_path):
    """Stop tokens: with eos_token_id=None, generate stops at any id of generation_config.json's list
    (Phi-3's <|end|> is its last), which replaces config.json's eos."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints("tiny-window", "official")[0], folder)
    ids = torch.randint(3, 256, (1, 5))
    free = p3.generate(p3.Phi3ForCausalLM.from_pretrained(folder), ids, 20, eos_token_id=[])[0, 5:].tolist()
    stop = free[6]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [123, stop]}))
    out = p3.generate(p3.Phi3ForCausalLM.from_pretrained(folder), ids, 20)
    assert int(out[0, -1]) == stop and out.shape[1] == 5 + free.index(stop) + 1


def test_a_row_that_stopped_is_padded_until_every_row_has(checkpoints):
    """Stop tokens in a batch: a row that hit one gets pad_token_id from then on, while the others go
    on, as in transformers' generate."""
    folder, hf = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (2, 5))
    free = p3.generate(model, ids, 20, eos_token_id=[])[:, 5:]  # (2, 20)
    first = lambda row, t: next((i for i, x in enumerate(free[row].tolist()) if x == t), 99)
    # row 0 stops first, early
    stop = next(int(t) for t in free[0, 1:] if first(1, int(t)) > first(0, int(t)) + 3)
    end = first(0, stop)
    stopped = p3.generate(model, ids, 20, eos_token_id=[stop])
    assert stopped.shape[1] >= 5 + end + 4  # row 1 went on
    assert (stopped[0, 5 + end + 1:] == model.config.pad_token_id).all() and int(stopped[0, 5 + end]) == stop
    assert torch.equal(stopped[1, 5:], free[1, : stopped.shape[1] - 5])
    assert torch.equal(stopped, hf_generate(hf, ids, 20, eos=[stop]))


def test_stop_tokens_default_to_generation_config(checkpoints, tmp_path):
    """Phi-3 stops at <|endoftext|>, <|assistant|> and <|end|> (generation_config.json), not just eos."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints("tiny-window", "official")[0], folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": [32000, 32001, 32007]}')
    assert p3.Phi3ForCausalLM.from_pretrained(folder).config.stop_token_ids == [32000, 32001, 32007]
    (folder / "generation_config.json").unlink()
    assert p3.Phi3ForCausalLM.from_pretrained(folder).config.stop_token_ids == [2]  # config.json's eos


def test_streaming_yields_each_token_as_it_is_chosen(checkpoints):
    folder, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (2, 4))
    stream = p3.stream_tokens(model, ids, 10, eos_token_id=[])
    first = next(stream)
    assert first.shape == (2,)
    rest = list(stream)
    assert torch.equal(torch.stack([first, *rest], 1), p3.generate(model, ids, 10, eos_token_id=[])[:, 4:])


def test_trained_tiny_model_decodes_300_tokens_the_same_with_and_without_cache():
    """The built-in tiny model is trained, so its greedy choices are confident: a long run through its
    sliding window (256) must give the same tokens with the cache, without it, and in transformers."""
    model = p3.Phi3ForCausalLM.from_pretrained("tiny")
    bos = torch.tensor([[1]])
    with_cache = p3.generate(model, bos, 300, eos_token_id=[])
    assert with_cache.shape == (1, 301)
    assert torch.equal(p3.generate(model, bos, 300, use_cache=False, eos_token_id=[]), with_cache)
    import transformers

    hf = transformers.Phi3ForCausalLM.from_pretrained(TINY, attn_implementation="eager").eval()
    assert torch.equal(hf_generate(hf, bos, 300, eos=[]), with_cache)


def test_left_padded_batch_across_the_longrope_switch_matches_transformers(checkpoints):
    """In a batch, LongRoPE picks its factors from the longest row and rebuilds the cache when the
    padded width passes original_max, for every row at once: exactly what transformers does."""
    folder, hf = checkpoints("tiny-longrope")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    torch.manual_seed(6)
    ids = torch.randint(3, 256, (2, SMALL_ORIGINAL_MAX - 3))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # row 1: 9 real tokens
    batch = p3.generate(model, ids, 10, eos_token_id=[], attention_mask=mask)
    assert torch.equal(batch, hf_generate(hf, ids, 10, eos=[], mask=mask))
    assert torch.equal(p3.generate(model, ids, 10, use_cache=False, eos_token_id=[], attention_mask=mask),
                       batch)


def test_longrope_switch_follows_the_longest_real_row_not_the_padded_width(checkpoints):
    """LongRoPE quirk with every row left-padded: the factors switch when the longest row's real tokens
    pass original_max, later than the padded width does; the cache is rebuilt at that step, so cached,
    uncached and compiled generation give the tokens of transformers' uncached generate."""
    folder, hf = checkpoints("tiny-longrope")
    model, hf = p3.Phi3ForCausalLM.from_pretrained(folder), copy.deepcopy(hf)
    with torch.no_grad():  # 3x the weights: attention sharp enough that stale rotations change tokens
        for name, weight in model.named_parameters():
            for w in (weight, hf.get_parameter(name)):
                w.mul_(3)
    torch.manual_seed(7)
    ids = torch.randint(3, 256, (2, SMALL_ORIGINAL_MAX - 3))
    mask = torch.ones_like(ids)
    mask[0, :3], mask[1, :20] = 0, 0  # no row is unpadded: the longest has 26 real tokens
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[],
                               pad_token_id=0, use_cache=False)
    uncached = p3.generate(model, ids, 12, use_cache=False, eos_token_id=[], attention_mask=mask)
    assert torch.equal(uncached, expected)
    assert torch.equal(p3.generate(model, ids, 12, eos_token_id=[], attention_mask=mask), expected)
    assert torch.equal(p3.generate(model, ids, 12, eos_token_id=[], attention_mask=mask, compile=True),
                       expected)


def test_a_padded_batch_without_its_mask_is_warned_about(checkpoints):
    folder, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])  # pad_token_id 0
    with pytest.warns(UserWarning,
                      match="input_ids: a row starts with the pad id 0 and no attention_mask was given"):
        p3.generate(model, ids, 3, eos_token_id=[])


def test_stream_yields_before_computing_the_next_step(checkpoints, monkeypatch):
    folder, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    calls = []
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    stream = p3.stream_tokens(model, torch.randint(3, 256, (1, 4)), 10, eos_token_id=[])
    next(stream)
    assert len(calls) == 1  # only the prefill has run
    next(stream)
    assert len(calls) == 2


def test_fp16_left_padding_gives_no_nan(checkpoints):
    """A row of padding has every key masked; the mask is added in fp32 so fp16 cannot overflow to NaN."""
    folder, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder, dtype="fp16")
    ids = torch.randint(3, 256, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    assert torch.isfinite(logits[mask.bool()]).all()
    reference = p3.Phi3ForCausalLM.from_pretrained(folder)(ids[:1, 5:])
    assert (logits[0, 5:].float() - reference[0]).abs().max() < 0.05


def test_generation_may_end_one_token_past_the_last_position(checkpoints):
    """The last new token is returned, never fed back: a 60-token prompt and 5 new tokens read 64
    positions, all a 64-position model has, so the sequence may end at 65 tokens (transformers too)."""
    folder, hf = checkpoints("tiny-window")  # max_position_embeddings 64
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(5))
    expected = hf_generate(hf, ids, 5, eos=[])
    assert expected.shape == (1, 65)
    for options in ({}, {"use_cache": False}, {"compile": True}):
        assert torch.equal(p3.generate(model, ids, 5, eos_token_id=[], **options), expected), options


def test_a_row_that_stopped_is_padded_with_the_pad_token_id_given(checkpoints):
    """pad_token_id= fills a row that stopped before the others, as in transformers' generate; a pad
    id outside the vocabulary, which that row would be fed, is refused."""
    folder, hf = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    free = p3.generate(model, ids, 12, eos_token_id=[])
    # row 0 stops, row 1 goes on
    stop = next(int(t) for t in free[0, 5:] if int(t) not in free[1, 5:].tolist())
    ours = p3.generate(model, ids, 12, eos_token_id=[stop], pad_token_id=7)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=[stop], pad_token_id=7)
    assert torch.equal(ours, theirs) and (ours[0, -1] == 7)
    notebook = p3.AutoModelForCausalLM.from_pretrained(str(folder))  # the notebook's generate passes it on
    assert torch.equal(notebook.generate(input_ids=ids, max_new_tokens=12, eos_token_id=[stop],
                                         pad_token_id=7), ours)
    with pytest.raises(p3.Phi3Error,
                       match=r"pad_token_id: 256 is outside the vocabulary, 0..255; a row that stops"):
        p3.generate(model, ids, 12, eos_token_id=[stop], pad_token_id=256)
    # Phi3Config's default, for a config built in code with a small vocabulary
    model.config.pad_token_id = 32000
    with pytest.raises(p3.Phi3Error, match=r"the model's pad id \(config.pad_token_id\): 32000 is outside"):
        p3.generate(model, ids, 12, eos_token_id=[stop])
    # one row is never fed the pad id
    assert p3.generate(model, ids[:1], 3, eos_token_id=[stop]).shape[0] == 1
