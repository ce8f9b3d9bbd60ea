"""pipeline("text-generation", ...): transformers' text-generation pipeline, on this project's model.

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    generator("The KV cache")[0]["generated_text"]                         # the prompt and its continuation
    generator([{"role": "user", "content": "Hi"}])[0]["generated_text"]    # the chat, plus the answer

- A prompt string is encoded as it is; a list of messages goes through the chat template first.
- generated_text: the prompt and the new text; for a chat, the messages plus {"role": "assistant", ...}.
  With return_full_text=False, the new text alone, a string.
- A chat that ends with an assistant message is continued in that message (no generation prompt).
- Settings, at construction or per call: max_new_tokens, do_sample, temperature, top_k, top_p,
  num_return_sequences, return_full_text, continue_final_message. Anything else is refused.
- transformers 5.24's pipeline defaults: 256 new tokens, sampled at temperature 0.7 (top_k 50).
  Only what neither the call nor the checkpoint's generation_config.json sets takes them.
"""

from __future__ import annotations

import os

import torch

from .errors import Phi3Error
from .model import Phi3ForCausalLM
from .notebook import AutoModelForCausalLM, AutoTokenizer, NotebookModel, refuse
from .tokenizer import Tokenizer

PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}  # transformers 5.24's
SAMPLING = ("temperature", "top_k", "top_p")  # a pipeline default for these applies only when sampling
GENERATE = ("max_new_tokens", "do_sample", "num_return_sequences") + SAMPLING
OUTPUT = ("return_full_text", "continue_final_message")


class TextGenerationPipeline:
    """generator(prompt) -> [{"generated_text": ...}], one dict per returned sequence."""

    def __init__(self, model: NotebookModel, tokenizer: Tokenizer, **settings):
        refuse("pipeline", {k: v for k, v in settings.items() if k not in GENERATE + OUTPUT})
        self.model, self.tokenizer, self.settings = model, tokenizer, settings

    def __call__(self, inputs, **kwargs) -> list:
        """One prompt or chat: a list of dicts. A list of prompts or chats: a list of those lists."""
        refuse("generator(...)", {k: v for k, v in kwargs.items() if k not in GENERATE + OUTPUT})
        settings = {**self.settings, **kwargs}
        if isinstance(inputs, str) or is_chat(inputs):
            return self.complete(inputs, settings)
        if isinstance(inputs, (list, tuple)) and inputs and \
                all(isinstance(x, str) or is_chat(x) for x in inputs):
            return [self.complete(x, settings) for x in inputs]
        raise Phi3Error(f"generator(inputs): expected a prompt string, a list of messages "
                        f"([{{'role': 'user', 'content': ...}}]) or a list of either, got {inputs!r:.80}")

    def complete(self, prompt: str | list[dict], settings: dict) -> list[dict]:
        """The pipeline for one prompt or one chat."""
        full_text, go_on = settings.get("return_full_text", True), settings.get("continue_final_message")
        if not isinstance(full_text, bool) or not (go_on is None or isinstance(go_on, bool)):
            raise Phi3Error(f"return_full_text must be True or False "
                            f"and continue_final_message True, False or None, "
                            f"got {full_text!r:.40} and {go_on!r:.40}")
        model = self.model.causal_lm
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            go_on = prompt[-1]["role"] == "assistant" if go_on is None else go_on  # transformers' default
            text = Tokenizer.apply_chat_template(self.tokenizer, prompt, add_generation_prompt=not go_on,
                                                 continue_final_message=go_on)
            ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template writes them
        ids = torch.tensor([ids], device=model.lm_head.weight.device)  # (1, T)
        out = self.model.generate(ids, **self.generate_settings(settings))  # (n, T + new)
        results = []
        for row in out:
            new = self.tokenizer.decode(row[ids.shape[1]:].tolist(), skip_special_tokens=True)
            if not full_text:
                text = new
            elif isinstance(prompt, str):
                text = prompt + new
            elif go_on:  # the last message, continued
                text = [*prompt[:-1], {"role": prompt[-1]["role"], "content": prompt[-1]["content"] + new}]
            else:
                text = [*prompt, {"role": "assistant", "content": new}]
            results.append({"generated_text": text})
        return results

    def generate_settings(self, settings: dict) -> dict:
        """model.generate's arguments: the user's, then PIPELINE_DEFAULTS where neither user nor
        checkpoint set one."""
        given = {k: settings[k] for k in GENERATE if k in settings}
        set_before = {**self.model.causal_lm.config.generation_defaults, **given}
        added = {k: v for k, v in PIPELINE_DEFAULTS.items() if k not in set_before}
        if not {**set_before, **added}.get("do_sample"):  # greedy: no sampling default
            added = {k: v for k, v in added.items() if k not in SAMPLING}
        return {**given, **added}


def is_chat(value) -> bool:
    """A list of messages: dicts with a role and a content."""
    return isinstance(value, (list, tuple)) and bool(value) and \
        all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def pipeline(task: str, model=None, tokenizer=None, **settings) -> TextGenerationPipeline:
    """transformers' pipeline("text-generation", model=..., tokenizer=..., **settings); see this
    module's docstring."""
    if task != "text-generation":
        raise Phi3Error(f"pipeline({task!r}): phi3_scratch has the 'text-generation' pipeline only")
    if model is None:
        raise Phi3Error("pipeline('text-generation', ...): give model= (and tokenizer=)")
    # A folder or repo id, as transformers' pipeline takes: load both.
    if isinstance(model, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(model) if tokenizer is None else tokenizer
        model = AutoModelForCausalLM.from_pretrained(model)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if isinstance(model, Phi3ForCausalLM):
        model = NotebookModel(model)
    if not isinstance(model, NotebookModel) or not isinstance(tokenizer, Tokenizer):
        raise Phi3Error(f"pipeline('text-generation', ...): model= and tokenizer= must be a model and "
                        f"a tokenizer (or a folder or repo id), "
                        f"got {type(model).__name__} and {type(tokenizer).__name__}")
    return TextGenerationPipeline(model, tokenizer, **settings)
