"""The teaching notebook's transformers calls, answered by this project's code: change one import.

    from phi3_scratch import AutoModelForCausalLM, AutoTokenizer, pipeline

and the notebook's cells run unchanged (notebooks/phi3_notebook.ipynb is that notebook):

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, device_map="cuda", torch_dtype="auto",
                                                 trust_remote_code=False)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, return_full_text=False,
                         max_new_tokens=200, do_sample=False)
    generator(prompt)[0]["generated_text"]
    print(model)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    lm_head_output = model.lm_head(model.model(input_ids)[0])
    tokenizer.decode(lm_head_output[0, -1].argmax(-1))
    model.generate(input_ids=input_ids, max_new_tokens=100, use_cache=False)

So do the chapters after it: chat messages, sampling, apply_chat_template (pipeline.py has the pipeline).

- The layer is thin: the model is a Phi3ForCausalLM, the tokenizer a Tokenizer.
- What the notebook indexes (`model.model(ids)[0]`, `tokenizer(p).input_ids`) indexes as in transformers.
- Every other attribute is the plain one underneath.
- An argument it does not implement is an error, never silently ignored.
- The plain API (p3.Phi3ForCausalLM, p3.generate, ...) is unchanged: there `model.model(ids)` is the
  hidden states tensor itself, and generate is greedy unless given a temperature.
"""

from __future__ import annotations

import torch

from .errors import Phi3Error, is_integer, is_number, warn
from .generation import generate
from .model import Phi3ForCausalLM
from .tokenizer import Tokenizer

# transformers' defaults for what neither the call nor the checkpoint's generation_config.json sets.
GENERATE_DEFAULTS = {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                     "num_return_sequences": 1}


class ModelOutput(tuple):
    """A tuple whose items also have names, as transformers' outputs: out[0] is out.last_hidden_state."""

    def __new__(cls, **fields):
        out = super().__new__(cls, fields.values())
        out.__dict__.update(fields)
        return out


class Encoding(dict):
    """A tokenizer's result, like transformers' BatchEncoding: enc["input_ids"] and enc.input_ids alike."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> Encoding:
        """The same encoding with its tensors on `device`."""
        return Encoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def refuse(where: str, unsupported: dict) -> None:
    if unsupported:
        raise Phi3Error(f"{where}: {', '.join(f'{k}={v!r:.40}' for k, v in unsupported.items())} "
                        "is not supported by phi3_scratch's notebook layer; "
                        "the plain API (phi3_scratch.generate, ...) says what is")


class NotebookTokenizer(Tokenizer):
    """The Tokenizer, callable like transformers' (`tokenizer(text, return_tensors="pt")`)."""

    def __call__(self, text: str, return_tensors: str | None = None, **kwargs) -> Encoding:
        refuse("tokenizer(...)", kwargs)
        return self._encoding([self.encode(text)], return_tensors, batched=False, where="tokenizer(...)")

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True,
                            return_tensors: str | None = None, return_dict: bool = True, **kwargs):
        """transformers' apply_chat_template, with its defaults: an Encoding of input_ids and attention_mask.

        - tokenize=False: the prompt text (a list of texts for a list of conversations).
        - return_dict=False: the ids alone. return_tensors="pt": tensors, (1, T) for one conversation.
        - continue_final_message=True: the text stops inside the last message, for the model to go on.
        """
        refuse("apply_chat_template(...)", kwargs)
        if add_generation_prompt and continue_final_message:
            raise Phi3Error("apply_chat_template: add_generation_prompt=True and continue_final_message=True "
                            "contradict each other: one starts a new assistant message, "
                            "the other continues the last one; pass one of them")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        texts = [Tokenizer.apply_chat_template(self, c, add_generation_prompt, continue_final_message)
                 for c in (conversation if batched else [conversation])]
        if not tokenize:
            return texts if batched else texts[0]
        rows = [self.encode(text, add_special_tokens=False) for text in texts]  # the template writes them
        encoding = self._encoding(rows, return_tensors, batched, where="apply_chat_template(...)")
        return encoding if return_dict else encoding["input_ids"]

    def _encoding(self, rows: list[list[int]], return_tensors, batched: bool, where: str) -> Encoding:
        if return_tensors not in (None, "pt"):
            raise Phi3Error(f"{where}: return_tensors={return_tensors!r}; expected 'pt' or None")
        masks = [[1] * len(row) for row in rows]
        if return_tensors == "pt":
            if len({len(row) for row in rows}) > 1:
                raise Phi3Error(f"{where}: the conversations are {[len(r) for r in rows]} tokens long; "
                                "return_tensors='pt' needs one length (give them one at a time)")
            return Encoding(input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks))
        if batched:
            return Encoding(input_ids=rows, attention_mask=masks)
        return Encoding(input_ids=rows[0], attention_mask=masks[0])

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
    """A Phi3ForCausalLM with transformers' calling conventions; lm_head, config, parameters(), ... are
    the plain model's."""

    def __init__(self, model: Phi3ForCausalLM):
        super().__init__(model)
        self.causal_lm = model  # the plain model: everything below runs it
        self.model = Body(model.model)

    @property
    def device(self) -> torch.device:
        """Where the weights are, as transformers' model.device: `inputs.to(model.device)`."""
        return self.causal_lm.lm_head.weight.device

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> ModelOutput:
        refuse("model(...)", kwargs)
        with torch.no_grad():
            return ModelOutput(logits=self.causal_lm(input_ids, attention_mask=attention_mask))

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, num_return_sequences: int | None = None, use_cache: bool = True,
                 eos_token_id=None, pad_token_id=None, **kwargs) -> torch.Tensor:
        """The prompt and the new tokens, (B * num_return_sequences, T + new), as transformers' generate.

        - An argument left None comes from the checkpoint's generation_config.json, else transformers' default
          (GENERATE_DEFAULTS): greedy, 20 new tokens; do_sample=True samples with top_k=50, temperature=1.0.
        - Sampling draws from torch's global generator: torch.manual_seed(n) first repeats a run.
        """
        refuse("model.generate", kwargs)
        if not isinstance(input_ids, torch.Tensor):
            raise Phi3Error(f"model.generate: input_ids must be a tensor of token ids (B, T), "
                            f"got {input_ids!r:.60} (tokenizer(text, return_tensors='pt') makes one)")
        given = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                 "top_k": top_k, "top_p": top_p, "num_return_sequences": num_return_sequences}
        s = generation_settings(self.causal_lm.config.generation_defaults,
                                {k: v for k, v in given.items() if v is not None})
        n = s["num_return_sequences"]
        if n > 1:  # each prompt row n times in a row, as transformers orders them
            input_ids = input_ids.repeat_interleave(n, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(n, dim=0)
        sampling = s["do_sample"]
        return generate(self.causal_lm, input_ids, s["max_new_tokens"], use_cache=use_cache,
                        eos_token_id=eos_token_id, attention_mask=attention_mask,
                        temperature=s["temperature"] if sampling else 0.0,
                        top_k=(s["top_k"] or None) if sampling else None,  # 0: no top-k cut
                        top_p=s["top_p"] if sampling and s["top_p"] < 1 else None, pad_token_id=pad_token_id)


def generation_settings(checkpoint: dict, given: dict) -> dict:
    """The settings one generate call runs with: `given`, else the checkpoint's, else GENERATE_DEFAULTS.

    - do_sample=False is greedy; a temperature, top_k or top_p given with it is ignored, with a warning.
    - Each value is checked, with the argument's name.
    """
    s = {**GENERATE_DEFAULTS, **checkpoint, **given}
    checks = {
        "max_new_tokens": (lambda v: is_integer(v) and v >= 1, "a positive integer"),
        "do_sample": (lambda v: isinstance(v, bool), "True or False"),
        "temperature": (lambda v: is_number(v) and 0 < v < float("inf"), "a finite number > 0"),
        "top_k": (lambda v: is_integer(v) and v >= 0, "an integer >= 0 (0: no top-k cut)"),
        "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "num_return_sequences": (lambda v: is_integer(v) and v >= 1, "a positive integer"),
    }
    for name, (ok, expected) in checks.items():
        if not ok(s[name]):
            where = "" if name in given else " (from the checkpoint's generation_config.json)"
            raise Phi3Error(f"{name}={s[name]!r}{where}: expected {expected}")
    if not s["do_sample"]:
        unused = [f"{k}={given[k]!r}" for k, neutral in (("temperature", 1.0), ("top_k", 50), ("top_p", 1.0))
                  if k in given and given[k] != neutral]
        if unused:
            warn(f"{', '.join(unused)}: do_sample is False, so generation is greedy and only sampling reads "
                 f"{'it' if len(unused) == 1 else 'them'}; pass do_sample=True to sample "
                 f"(transformers ignores {'it' if len(unused) == 1 else 'them'} too)")
        if s["num_return_sequences"] > 1:
            raise Phi3Error(f"num_return_sequences={s['num_return_sequences']}: "
                            "greedy decoding (do_sample=False) gives one sequence per prompt; "
                            "pass do_sample=True for several (transformers refuses it too)")
    return s


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path_or_repo_id, device_map: str | None = None, torch_dtype=None, dtype=None,
                        trust_remote_code: bool = False, **kwargs) -> NotebookModel:
        """device_map: one device ("cuda", "cpu", "auto"); torch_dtype (or dtype) "auto" keeps the
        checkpoint's."""
        refuse("AutoModelForCausalLM.from_pretrained", kwargs)
        no_remote_code(trust_remote_code)
        if device_map is not None and not isinstance(device_map, (str, torch.device)):
            raise Phi3Error(f"device_map={device_map!r:.60}: phi3_scratch puts the whole model on one "
                            "device; give its name ('cuda', 'cpu' or 'auto')")
        device = str(device_map or "cpu")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype if dtype is not None else torch_dtype  # "auto": the loader keeps the checkpoint's
        return NotebookModel(Phi3ForCausalLM.from_pretrained(path_or_repo_id, device=device, dtype=dtype))


def no_remote_code(trust_remote_code: bool) -> None:
    if trust_remote_code:
        raise Phi3Error("trust_remote_code=True: phi3_scratch never runs code from a checkpoint "
                        "(it is Phi-3's code, written here); pass trust_remote_code=False")
