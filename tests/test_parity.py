"""Logits of phi3_scratch equal transformers' Phi3ForCausalLM (eager, float32) for every family member.

Lengths: 5 (inside the sliding window of 8), 20 (across the window), 40 (across the window and,
for LongRoPE models, past original_max = 32, so the long factors are used).
"""

import pytest
import torch

import phi3_scratch as p3

from .conftest import FAMILY, INLINE, model_params

TOL = 1e-4


def hf_logits(hf, ids, mask=None, positions=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("fmt", ["transformers", "official"])
@pytest.mark.parametrize("name", model_params(*FAMILY, *INLINE))
def test_logits_match_transformers(checkpoints, name, fmt, report):
    folder, hf = checkpoints(name, fmt)
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    for length in (5, 20, 40):
        ids = torch.randint(0, model.config.vocab_size, (2, length))
        with torch.no_grad():
            ours = model(ids)
        ref = hf_logits(hf, ids)
        diff = (ours - ref).abs().max().item()
        report(f"parity {name:26s} {fmt:12s} T={length:3d}: max |logit diff| {diff:.2e} (max |logit| "
               f"{ref.abs().max():.1f})")
        assert diff < TOL, f"{name} ({fmt} config), length {length}: logits differ by {diff}"


@pytest.mark.parametrize("name", model_params("tiny-window", "tiny-longrope", "Phi-3-mini-4k-instruct",
                                              "Phi-3.5-mini-instruct", "Phi-4-mini-instruct"))
def test_left_padded_batch_matches_transformers(checkpoints, name):
    folder, hf = checkpoints(name)
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    torch.manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (3, 36))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1: 29 real tokens
    mask[2, :30] = 0  # row 2: 6 real tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    ref = hf_logits(hf, ids, mask, positions)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() < TOL


def test_module_tree_matches_transformers(checkpoints):
    """print(model) shows transformers' tree: same module names (dropouts aside: inference only)."""
    folder, hf = checkpoints("tiny-longrope")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ours = {name for name, _ in model.named_modules()}
    theirs = {name for name, _ in hf.named_modules() if "dropout" not in name}
    assert ours == theirs
    assert set(model.state_dict()) == set(hf.state_dict())
