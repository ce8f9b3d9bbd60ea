"""One forward pass for everything, and checks at the edge.

Phi3ForCausalLM.forward is what a user's `model(ids)`, every prefill and decode step of generate,
and the Stepper run: a breakpoint there stops on every step. The input is checked once per public
call, so that a decode step reads one value back from the device (the stop flag): on a GPU each
read waits for the GPU to finish what it was given.
"""

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import phi3_scratch as p3

FORWARD = p3.Phi3ForCausalLM.forward.__code__
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__}


def forward_calls(run) -> int:
    """How often Phi3ForCausalLM.forward starts while run() runs, seen as a debugger sees it
    (sys.settrace)."""
    calls, previous = 0, sys.gettrace()

    def tracer(frame, event, arg):
        nonlocal calls
        calls += event == "call" and frame.f_code is FORWARD
        return None  # no line events: only the calls matter

    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(previous)
    return calls


class DeviceReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value back to the host (item, bool, int, tolist, ...)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in READS
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny():
    return p3.Phi3ForCausalLM.from_pretrained("tiny")


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_breakpoint_on_forward_stops_at_every_decode_step(tiny, use_cache):
    ids = torch.tensor([[1, 400, 401]])
    # 20 tokens: the prefill gives the first, 19 decode steps the others
    assert forward_calls(lambda: p3.generate(tiny, ids, 20, use_cache=use_cache, eos_token_id=[])) == 20


def test_the_stepper_runs_the_same_forward(tiny):
    holder = []
    assert forward_calls(lambda: holder.append(p3.Stepper(tiny, [1, 400, 401]))) == 1  # the prompt
    stepper = holder[0]
    assert forward_calls(lambda: [stepper.choose() for _ in range(5)]) == 5  # one a step


@pytest.mark.parametrize("padded", [False, True])
def test_a_decode_step_reads_one_value_from_the_device(tiny, padded, report):
    ids = torch.tensor([[0, 0, 1, 400, 401], [1, 402, 403, 404, 405]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]) if padded else None
    with DeviceReads() as reads:
        out = p3.generate(tiny, ids, 20, eos_token_id=[], attention_mask=mask)
    assert out.shape == (2, 25)
    report(f"device reads while generating 20 tokens{' (padded batch)' if padded else ''}: {reads.count}")
    # the stop flag of 19 decode steps; once at the start, the input checks (ids, mask or a padded
    # first column, the padding count). Tight on purpose: a new read must be accounted for here.
    assert reads.count <= 19 + 4


def test_a_users_call_is_still_checked(tiny):
    with pytest.raises(p3.Phi3Error, match="token id 5000 is outside the vocabulary"):
        tiny(torch.tensor([[1, 5000]]))
    cache = tiny.new_cache(max_len=4)
    tiny(torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(p3.Phi3Error, match="KV cache full"):
        tiny(torch.tensor([[4, 5]]), cache)


def test_logits_to_keep_gives_the_last_positions(tiny):
    ids = torch.tensor([[1, 400, 401, 402]])
    with torch.no_grad():
        every = tiny(ids)
        assert torch.allclose(tiny(ids, logits_to_keep=1), every[:, -1:], atol=1e-5)  # one matmul fewer rows
        assert torch.allclose(tiny(ids, logits_to_keep=3), every[:, -3:], atol=1e-5)
