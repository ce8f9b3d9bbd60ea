"""What every command shares: the flags' types, loading a checkpoint with its tokenizer, streaming text.

- load: the config first (a bad folder fails at once), then the tokenizer, then the weights with a bar.
- model_config, meta_model: a model's shape without its weights, for `arch` and the early checks.
- stream_text: the new text as generation makes it, the stop token left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Phi3Config
from ..errors import Phi3Error
from ..generation import stream_tokens
from ..loading import CONFIG_FILES, resolve_checkpoint, resolve_dtype, weight_bytes
from ..model import Phi3ForCausalLM
from ..quantize import LINEAR, method_to_load, use_quantized_modules
from ..tokenizer import Tokenizer


DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
BAR = "{desc} [{bar:30}] {n_fmt}/{total_fmt}{unit}"  # tqdm's bar, as the load shows it
TOKENIZER_MODELS = ("tokenizer.model", "tokenizer.json")  # Phi-3's sentencepiece model, Phi-4's BPE


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def digits(text: str) -> bool:
    """0-9 only: str.isdigit() also takes '²' and other digits that int() refuses or reads as numbers."""
    return text.isascii() and text.isdigit()


def positive_int(text: str) -> int:
    value = int(text) if digits(text.lstrip("-")) else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def log(message: str = "", end: str = "\n") -> None:
    print(message, end=end, file=sys.stderr, flush=True)


def model_folder(args):
    return resolve_checkpoint(args.model)  # a repo id downloads here, with huggingface-hub's bars


def model_config(args) -> Phi3Config:
    """The config of --model, without its weights: a Phi-3 family repo id needs no download at all
    (family.py knows its config); another repo id downloads only its config files."""
    from ..family import config as family_config, find

    if not Path(args.model).expanduser().is_dir() and find(args.model):
        return family_config(args.model)
    return Phi3Config.from_pretrained(resolve_checkpoint(args.model, CONFIG_FILES))


def meta_model(args) -> Phi3ForCausalLM:
    """The model of --model with shapes and dtypes but no weights (the meta device): for `arch`."""
    config = model_config(args)
    # the checkpoint's, unless --dtype says
    dtype = resolve_dtype(args.dtype or "auto", torch.device("cpu"), saved_dtype(config))
    config.quantization = method_to_load(args.quantize, config.quantization, args.model)  # arch prints it
    return on_meta(config, dtype, config.quantization)


def saved_dtype(config: Phi3Config) -> torch.dtype:
    """The checkpoint's dtype as its config.json names it (fp32 when it does not): what --dtype auto means."""
    return resolve_dtype(config.torch_dtype or "float32", torch.device("cpu"), torch.float32)


def on_meta(config: Phi3Config, dtype: torch.dtype, quantize: str | None) -> Phi3ForCausalLM:
    """The model with shapes and dtypes but no storage (quantized matrices if `quantize` names a method)."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(config).to(dtype)
        if quantize:
            use_quantized_modules(model, quantize, dtype)
    return model


def check_max_new_tokens(args) -> Phi3Config:
    """-n against the model's positions, from its config alone (a prompt has at least one token);
    returns the config."""
    config = model_config(args)
    if getattr(args, "max_new_tokens", 0) > config.max_position_embeddings:
        raise Phi3Error(f"--max-new-tokens {args.max_new_tokens}: more new tokens than the model has "
                        f"positions ({config.max_position_embeddings}), prompt included")
    return config


def load(args) -> tuple[Phi3ForCausalLM, Tokenizer]:
    start = time.perf_counter()
    local = Path(args.model).expanduser()
    config = check_max_new_tokens(args)  # reads the config: a folder that is no checkpoint says so here
    # The tokenizer first (for a repo id, its files only): one that cannot be read fails in seconds,
    # before gigabytes of weights download.
    if not args.tokenizer and local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_MODELS):
        raise Phi3Error(f"{local / 'tokenizer.model'} not found, and no tokenizer.json: {args.model} "
                        "holds no tokenizer (model.save_pretrained writes none); "
                        "give one with --tokenizer DIR (or a repo id, or 'tiny')")
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.vocab_size > config.vocab_size:  # its ids would run past the embedding
        which = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"the tokenizer of {args.model}"
        raise Phi3Error(f"{which} has {tokenizer.vocab_size} ids, more than the model's vocabulary of "
                        f"{config.vocab_size}: they were not made for each other")
    folder = model_folder(args)
    say_memory(args, config)
    log(f"loading {args.model} ({folder}) onto {args.device}")

    bars = []  # tqdm's bar, made at the first tensor, when the total is known

    def progress(done: int, total: int) -> None:
        if not bars:  # a log file or a pipe gets the first and the last state only
            every = 0.1 if sys.stderr.isatty() else float("inf")
            bars.append(tqdm(total=total, desc="  weights", unit=" tensors", file=sys.stderr,
                             mininterval=every, bar_format=BAR))
        bars[0].update(done - bars[0].n)

    try:
        model = Phi3ForCausalLM.from_pretrained(folder, device=args.device, dtype=args.dtype,
                                                progress=progress, attention=args.attention,
                                                quantize=args.quantize)
    finally:
        for bar in bars:
            bar.close()
    weight = model.model.embed_tokens.weight
    kind = (f"{model.config.quantization} matrices, {weight.dtype} otherwise" if model.config.quantization
            else weight.dtype)
    log(f"loaded {count(model):,} parameters ({kind}, {weight_bytes(model) / 1e9:.3f} GB) and "
        f"the tokenizer in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def say_memory(args, config: Phi3Config) -> None:
    """Before a large CPU load: how much memory the weights will take, and how to halve it (config:
    the checkpoint's, as load read it)."""
    if torch.device(args.device).type != "cpu":
        return
    dtype = resolve_dtype(args.dtype, torch.device("cpu"), saved_dtype(config))
    quantize = args.quantize or config.quantization
    size = weight_bytes(on_meta(config, dtype, quantize))
    if size > 2**30:
        hint = "; --dtype bf16 halves it" if dtype == torch.float32 else ""
        if not quantize:
            hint += ("; " if not hint else ", ") + ("--quantize int8 takes about a quarter of fp32, "
                                                    "int4 a sixth (fastest with --compile)")
        log(f"the weights take {size / 1e9:.1f} GB of memory in {str(dtype).removeprefix('torch.')} "
            f"on the CPU{hint}")


def count(model) -> int:
    """Phi-3's parameters in `model`: a tied head once; a quantized matrix as its in x out weights
    (its packing, scales and offsets are not parameters of Phi-3)."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, tuple(LINEAR.values()))}
    plain = sum(p.numel() for name, p in model.named_parameters() if name.rpartition(".")[0] not in quantized)
    return plain + sum(m.in_features * m.out_features for m in quantized.values())


def stop_ids(model, tokenizer) -> list[int]:
    return sorted(set(model.config.stop_token_ids) | set(tokenizer.stop_ids))


def encode_prompt(tokenizer, prompt: str, chat: bool, device) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    return torch.tensor([tokenizer.encode(text)], device=device)  # (1, T)


def stream_text(model, tokenizer, ids, args, new: list[int] | None = None) -> list[int]:
    """Print the new text as it is produced; return the new ids (stop token excluded).

    `new`, if given, receives the ids as they come, so a caller still has them after Ctrl-C.
    """
    new = [] if new is None else new
    stops = stop_ids(model, tokenizer)
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    started = False  # an input refused before the first token leaves stdout as it was
    try:
        for token in stream_tokens(model, ids, args.max_new_tokens, use_cache=not args.no_cache,
                                   eos_token_id=stops, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed, compile=args.compile):
            started = True
            token = int(token[0])
            if token in stops:
                break
            new.append(token)
            print(decoder.push(token), end="", flush=True)
    finally:  # also on Ctrl-C: the bytes of an unfinished character, then the line end
        if started or sys.exc_info()[0] is KeyboardInterrupt:  # not for an input refused at once
            print(decoder.finish(), flush=True)
    return new


def require_transformers(command: str):
    """The transformers module, or a Phi3Error saying that `command` needs it."""
    try:
        import transformers
    except ImportError:
        raise Phi3Error(f"{command} runs transformers beside this model, and transformers is not installed: "
                        "pip install transformers") from None
    return transformers
