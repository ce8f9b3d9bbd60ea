"""Sampling: the drawn tokens follow softmax(logits / T) restricted by top-k / top-p; a seed repeats a run."""

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.generation import sample

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
DRAWS = 40_000


def frequencies(**kwargs) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    draws = sample(LOGITS.expand(DRAWS, -1), generator=gen, **kwargs)
    return torch.bincount(draws, minlength=LOGITS.shape[1]).float() / DRAWS


def expected(temperature: float, keep: list[int]) -> torch.Tensor:
    p = torch.zeros(LOGITS.shape[1])
    p[keep] = (LOGITS[0, keep] / temperature).softmax(-1)
    return p


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_follows_the_tempered_softmax(temperature):
    assert torch.allclose(frequencies(temperature=temperature), expected(temperature, list(range(6))),
                          atol=0.01)


def test_top_k_keeps_only_the_k_most_likely():
    freq = frequencies(temperature=1.0, top_k=3)
    assert torch.allclose(freq, expected(1.0, [0, 1, 2]), atol=0.01)
    assert freq[3:].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS[0].softmax(-1)  # 0.53, 0.20, 0.12, 0.07, ...
    assert probs[0] < 0.7 < probs[:2].sum()  # p = 0.7 needs the top two tokens
    freq = frequencies(temperature=1.0, top_p=0.7)
    assert torch.allclose(freq, expected(1.0, [0, 1]), atol=0.01)
    assert freq[2:].sum() == 0
    assert frequencies(temperature=1.0, top_p=0.1)[0] == 1  # the most likely token always stays


def test_top_p_cuts_the_tempered_distribution_in_vocabulary_order():
    """Unsorted logits and a temperature: the kept set is chosen after tempering, and mapped back
    from sorted order to the tokens' own ids."""
    order = torch.tensor([3, 5, 0, 1, 4, 2])
    logits = LOGITS[:, order]  # the same numbers, most likely token at id 2
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(DRAWS, -1), temperature=2.0, top_p=0.7, generator=gen)
    probs = (logits[0] / 2.0).softmax(-1)
    ranked = probs.argsort(descending=True)
    # 3 tokens at T = 2, 2 at T = 1
    keep = ranked[: int(((probs[ranked].cumsum(0) - probs[ranked]) < 0.7).sum())]
    assert len(keep) == 3 and set(draws.unique().tolist()) == set(keep.tolist())


def test_seed_makes_generation_reproducible(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.randint(3, 256, (1, 4))
    run = lambda seed: p3.generate(model, ids, 20, eos_token_id=[], temperature=1.0, top_k=50, seed=seed)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert not torch.equal(run(7), p3.generate(model, ids, 20, eos_token_id=[]))


def test_bad_sampling_arguments():
    with pytest.raises(p3.Phi3Error, match="temperature must be a finite number >= 0"):
        p3.generation.check_sampling(-1.0, None, None)
    with pytest.raises(p3.Phi3Error, match="top_k must be a positive integer or None, got 0"):
        p3.generation.check_sampling(1.0, 0, None)
    with pytest.raises(p3.Phi3Error, match=r"top_p must be in \(0, 1\] or None, got 1.5"):
        p3.generation.check_sampling(1.0, None, 1.5)


def test_sampling_arguments_with_temperature_0_are_ignored_with_a_warning(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.randint(3, 256, (1, 4))
    with pytest.warns(UserWarning,
                      match=r"top_k=50, seed=7: only sampling reads them, and temperature=0 is greedy"):
        tokens = p3.generate(model, ids, 20, eos_token_id=[], top_k=50, seed=7)
    assert torch.equal(tokens, p3.generate(model, ids, 20, eos_token_id=[]))


def test_a_tiny_temperature_is_all_but_greedy_and_seeds_are_checked(checkpoints):
    """Logits over 1e-40 overflow; the largest is taken out first, so the draw is the argmax, not an error."""
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    assert sample(logits, 1e-40).tolist() == [0]
    for seed in (2**64, -(2**63) - 1, True):
        with pytest.raises(p3.Phi3Error, match=r"seed must be an integer in -2\*\*63..2\*\*64 - 1"):
            p3.generation.check_sampling(1.0, None, None, seed)
    with pytest.raises(p3.Phi3Error, match="top_k must be a positive integer or None, got True"):
        p3.generation.check_sampling(1.0, True, None)
