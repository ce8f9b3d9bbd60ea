"""The teaching notebook's transformers calls, answered by this project's code: change one import.

    from phi3_scratch import AutoModelForCausalLM, AutoTokenizer, pipeline

and the notebook's cells run unchanged (notebooks/phi3_notebook.ipynb is that notebook):

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, device_map="cuda", torch_dtype="auto", trust_remote_code=False)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, return_full_text=False,
                         max_new_tokens=200, do_sample=False)
    generator(prompt)[0]["generated_text"]
    print(model)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    lm_head_output = model.lm_head(model.model(input_ids)[0])
    tokenizer.decode(lm_head_output[0, -1].argmax(-1))
    model.generate(input_ids=input_ids, max_new_tokens=100, use_cache=False)

This layer is thin on purpose: the model is a Phi3ForCausalLM, the tokenizer a Tokenizer, and the
few objects the notebook indexes (`model.model(ids)[0]`, `generator(p)[0]["generated_text"]`,
`tokenizer(p).input_ids`) index as transformers' do. Every other attribute is the plain one
underneath. An argument it does not implement is an error, not silently ignored. The plain API
(p3.Phi3ForCausalLM, p3.generate, ...) is unchanged: there `model.model(ids)` is the hidden
states tensor itself.
"""

from __future__ import annotations

import os

import torch

from .errors import Phi3Error
from .generation import generate
from .model import Phi3ForCausalLM
from .tokenizer import Tokenizer


class ModelOutput(tuple):
    """A tuple whose items also have names, as transformers' outputs: out[0] is out.last_hidden_state."""

    def __new__(cls, **fields):
        out = super().__new__(cls, fields.values())
        out.__dict__.update(fields)
        return out


class Encoding(dict):
    """tokenizer(text)'s result: enc["input_ids"] and enc.input_ids alike."""

    __getattr__ = dict.__getitem__


def refuse(where: str, unsupported: dict) -> None:
    if unsupported:
        raise Phi3Error(f"{where}: {', '.join(f'{k}={v!r:.40}' for k, v in unsupported.items())} is not supported "
                        "by phi3_scratch's notebook layer; the plain API (phi3_scratch.generate, ...) says what is")


class NotebookTokenizer(Tokenizer):
    """The Tokenizer, callable like transformers' (`tokenizer(text, return_tensors="pt")`)."""

    def __call__(self, text: str, return_tensors: str | None = None, **kwargs) -> Encoding:
        refuse("tokenizer(...)", kwargs)
        if return_tensors not in (None, "pt"):
            raise Phi3Error(f"tokenizer(...): return_tensors={return_tensors!r}; expected 'pt' or None")
        ids = self.encode(text)
        if return_tensors == "pt":
            return Encoding(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return Encoding(input_ids=ids, attention_mask=[1] * len(ids))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Also one id: an int, or a 0-d tensor such as logits.argmax(-1)."""
        if isinstance(ids, int) or isinstance(ids, torch.Tensor) and ids.dim() == 0:
            ids = [int(ids)]
        return super().decode(ids, skip_special_tokens)


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path_or_repo_id, trust_remote_code: bool = False, **kwargs) -> NotebookTokenizer:
        refuse("AutoTokenizer.from_pretrained", kwargs)
        no_remote_code(trust_remote_code)
        return NotebookTokenizer.from_pretrained(path_or_repo_id)


class Wrapper:
    """Whatever a wrapper does not define itself (attributes, print) is the wrapped module's."""

    def __init__(self, wrapped):
        self._wrapped = wrapped

    def __getattr__(self, name):  # only called for what the wrapper lacks
        if name == "_wrapped":
            raise AttributeError(name)  # not set yet (a copy being made): no endless lookup
        return getattr(self._wrapped, name)

    def __repr__(self) -> str:
        return repr(self._wrapped)


class Body(Wrapper):
    """model.model as the notebook calls it: the output's [0] is the hidden states (B, T, H)."""

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> ModelOutput:
        refuse("model.model(...)", kwargs)
        with torch.no_grad():
            return ModelOutput(last_hidden_state=self._wrapped(input_ids, attention_mask=attention_mask))


class NotebookModel(Wrapper):
    """A Phi3ForCausalLM with transformers' calling conventions where the notebook uses them;
    lm_head, config, parameters(), ... are the plain model's."""

    def __init__(self, model: Phi3ForCausalLM):
        super().__init__(model)
        self.causal_lm = model  # the plain model: everything below runs it
        self.model = Body(model.model)

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> ModelOutput:
        refuse("model(...)", kwargs)
        with torch.no_grad():
            return ModelOutput(logits=self.causal_lm(input_ids, attention_mask=attention_mask))

    def generate(self, input_ids=None, max_new_tokens: int = 20, use_cache: bool = True, do_sample: bool = False,
                 attention_mask=None, eos_token_id=None, pad_token_id=None, **kwargs) -> torch.Tensor:
        """The prompt and the new tokens, (B, T + new), as transformers' generate returns them."""
        refuse("model.generate", kwargs)
        if input_ids is None:
            raise Phi3Error("model.generate: input_ids is required")
        return generate(self.causal_lm, input_ids, max_new_tokens, use_cache=use_cache, eos_token_id=eos_token_id,
                        attention_mask=attention_mask, temperature=1.0 if do_sample else 0.0, pad_token_id=pad_token_id)


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path_or_repo_id, device_map: str | None = None, torch_dtype=None, dtype=None,
                        trust_remote_code: bool = False, **kwargs) -> NotebookModel:
        """device_map: one device ("cuda", "cpu", "auto"); torch_dtype (or dtype) "auto" keeps the checkpoint's."""
        refuse("AutoModelForCausalLM.from_pretrained", kwargs)
        no_remote_code(trust_remote_code)
        if device_map is not None and not isinstance(device_map, (str, torch.device)):
            raise Phi3Error(f"device_map={device_map!r:.60}: phi3_scratch puts the whole model on one device; "
                            "give its name ('cuda', 'cpu' or 'auto')")
        device = str(device_map or "cpu")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype if dtype is not None else torch_dtype  # "auto": the loader keeps the checkpoint's
        return NotebookModel(Phi3ForCausalLM.from_pretrained(path_or_repo_id, device=device, dtype=dtype))


def no_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code:
        raise Phi3Error("trust_remote_code=True: phi3_scratch never runs code from a checkpoint (it is Phi-3's "
                        "code, written here); pass trust_remote_code=False")


class TextGenerationPipeline:
    """pipeline("text-generation", ...): generator(prompt) -> [{"generated_text": ...}]."""

    def __init__(self, model: NotebookModel, tokenizer: NotebookTokenizer, return_full_text: bool,
                 max_new_tokens: int, do_sample: bool):
        self.model, self.tokenizer = model, tokenizer
        self.return_full_text, self.max_new_tokens, self.do_sample = return_full_text, max_new_tokens, do_sample

    def __call__(self, text: str, **kwargs) -> list[dict]:
        refuse("generator(...)", kwargs)
        if not isinstance(text, str):
            raise Phi3Error(f"generator(text): expected a prompt string, got {type(text).__name__}")
        model = self.model.causal_lm if isinstance(self.model, NotebookModel) else self.model
        ids = torch.tensor([self.tokenizer.encode(text)], device=model.lm_head.weight.device)  # no chat template
        out = generate(model, ids, self.max_new_tokens, temperature=1.0 if self.do_sample else 0.0)
        new = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # the new tokens only
        return [{"generated_text": text + new if self.return_full_text else new}]


def pipeline(task: str, model=None, tokenizer=None, return_full_text: bool = True, max_new_tokens: int = 256,
             do_sample: bool = False, **kwargs) -> TextGenerationPipeline:
    refuse("pipeline", kwargs)
    if task != "text-generation":
        raise Phi3Error(f"pipeline({task!r}): phi3_scratch has the 'text-generation' pipeline only")
    if model is None:
        raise Phi3Error("pipeline('text-generation', ...): give model= (and tokenizer=)")
    if isinstance(model, (str, os.PathLike)):  # a folder or repo id, as transformers' pipeline takes: load both
        tokenizer = AutoTokenizer.from_pretrained(model) if tokenizer is None else tokenizer
        model = AutoModelForCausalLM.from_pretrained(model)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if not isinstance(model, (NotebookModel, Phi3ForCausalLM)) or not isinstance(tokenizer, Tokenizer):
        raise Phi3Error(f"pipeline('text-generation', ...): model= and tokenizer= must be a model and a tokenizer "
                        f"(or a folder or repo id), got {type(model).__name__} and {type(tokenizer).__name__}")
    return TextGenerationPipeline(model, tokenizer, return_full_text, max_new_tokens, do_sample)
