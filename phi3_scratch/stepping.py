"""Step-through decoding: one token at a time, with the choice in your hands.

    stepper = p3.Stepper(model, tokenizer.encode("The KV cache"), tokenizer=tokenizer, top_k=5)
    record = stepper.record()          # the candidates for the next token, nothing chosen yet
    record = stepper.choose()          # take the argmax ...
    record = stepper.choose(1234)      # ... or force any token id
    for record in stepper: ...         # or let it run greedily, a record a step

Each StepRecord holds:
- `position`: where the next token goes
- `cache_length`: how many positions the KV cache holds
- the next-token logits
- the top-k candidates with their probabilities

A forced choice is fed to the model exactly like a sampled one.
The cache then holds its keys and values, and the next logits follow from it.
The tests check both against a fresh forward pass of the whole sequence.

Every choice runs the model on the chosen token, to show the next record.
- generate returns max_new_tokens tokens after a prompt of T; it never feeds the last one back.
- A Stepper of the same max_new_tokens chooses as many.
- Its cache holds T + max_new_tokens positions, or one fewer when that is more than the model has.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .errors import Phi3Error, is_integer
from .generation import last_logits, next_logits
from .checks import check_input_ids
from .generation import as_causal_lm
from .model import Phi3ForCausalLM


@dataclass
class Candidate:
    token_id: int
    text: str  # the token's piece ("▁cache"), or "" without a tokenizer
    logit: float
    prob: float


@dataclass
class StepRecord:
    position: int  # where the next token will go (= the number of tokens so far)
    cache_length: int  # positions the KV cache holds
    logits: torch.Tensor  # (V,) fp32: the next-token logits
    candidates: list[Candidate]  # the top-k, most likely first
    chosen: int | None = None  # the token that was appended to reach this step (None at the start)
    chosen_text: str = ""  # its piece

    @property
    def argmax(self) -> int:
        return self.candidates[0].token_id


class Stepper:
    def __init__(
        self, model: Phi3ForCausalLM, prompt_ids, tokenizer=None, top_k: int = 5, max_new_tokens: int = 256
    ):
        model = as_causal_lm(model, "Stepper(model, prompt_ids)")
        if isinstance(prompt_ids, str):
            raise Phi3Error(
                "prompt_ids must be token ids, not text: encode it first, tokenizer.encode(text)"
            )
        if tokenizer is not None and not hasattr(tokenizer, "id_to_piece"):
            raise Phi3Error(f"tokenizer must be a p3.Tokenizer (p3.Tokenizer.from_pretrained(...)) or None, "
                            f"got {type(tokenizer).__name__}")
        try:
            # checked below, then made long
            ids = torch.as_tensor(prompt_ids, device=model.lm_head.weight.device)
        except (TypeError, ValueError) as e:  # ragged lists, odd objects
            raise Phi3Error(f"prompt_ids must be a list of token ids or a tensor: {e}") from None
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise Phi3Error(
                "prompt_ids must be one sequence (a list, a 1-D tensor or shape (1, T)), "
                f"got shape {tuple(ids.shape)}"
            )
        ids = ids[None]  # (1, T)
        # integers in the vocabulary: 1.7 is refused, not cut to 1
        check_input_ids(ids, model.config.vocab_size, "prompt_ids")
        ids = ids.long()
        for name, value in (("top_k", top_k), ("max_new_tokens", max_new_tokens)):
            if not is_integer(value) or value < 1:
                raise Phi3Error(f"{name} must be a positive integer, got {value!r}")
        # a prompt of exactly max_position_embeddings gets the first record and no choice
        if ids.shape[1] > model.config.max_position_embeddings:
            raise Phi3Error(f"the prompt has {ids.shape[1]} tokens, more than the model's "
                            f"{model.config.max_position_embeddings} positions")
        self.model, self.tokenizer, self.top_k = model, tokenizer, top_k
        self.ids: list[int] = ids[0].tolist()  # the whole sequence so far, prompt included
        max_len = min(len(self.ids) + max_new_tokens, model.config.max_position_embeddings)
        self.cache = model.new_cache(1, max_len=max_len)  # sized for the prompt + max_new_tokens
        with torch.no_grad():
            # ids were checked above
            self._record = self._make_record(last_logits(model, ids, self.cache, None)[0], None)

    def record(self) -> StepRecord:
        """The current step: candidates for the next token."""
        return self._record

    @torch.no_grad()
    def choose(self, token_id: int | None = None) -> StepRecord:
        """Append `token_id` (None: the argmax), run one step, and return the next record."""
        token = self._record.argmax if token_id is None else token_id
        try:
            # accepts ints, numpy ints and 0-d integer tensors
            token = None if isinstance(token, bool) else operator.index(token)
        except TypeError:
            token = None
        if token is None or not 0 <= token < self.model.config.vocab_size:
            raise Phi3Error(f"token_id must be in 0..{self.model.config.vocab_size - 1}, got {token_id!r}")
        if len(self.ids) + 1 > self.cache.max_len:
            raise Phi3Error(f"the sequence is full: {len(self.ids)} tokens of max_len={self.cache.max_len}")
        self.ids.append(token)
        seq = torch.tensor([self.ids], device=self.model.lm_head.weight.device)  # (1, T + 1)
        logits = next_logits(self.model, seq, self.cache, None)[0]  # (V,): the same step as generate's
        self._record = self._make_record(logits, token)
        return self._record

    def __iter__(self):
        """Greedy steps until the cache is full (stop ids are the caller's business)."""
        while len(self.ids) < self.cache.max_len:
            yield self.choose()

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_piece(token_id) if self.tokenizer is not None else ""

    def _make_record(self, logits: torch.Tensor, chosen: int | None) -> StepRecord:
        logits = logits.float()  # (V,)
        probs = logits.softmax(-1)  # (V,)
        top = logits.topk(min(self.top_k, logits.numel()))
        candidates = [Candidate(i, self._piece(i), v, probs[i].item())
                      for v, i in zip(top.values.tolist(), top.indices.tolist())]
        text = self._piece(chosen) if chosen is not None else ""
        return StepRecord(len(self.ids), self.cache.length, logits, candidates, chosen, text)
