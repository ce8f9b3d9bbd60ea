"""The `phi3-scratch` command (also `python -m phi3_scratch`): the teaching notebook, step by step.

    generate PROMPT    greedy continuation, 200 new tokens, only the new text, streamed
    chat               a conversation in the terminal (/reset, /exit)
    arch               the module tree, parameters per part, weight and KV-cache memory
    next-token PROMPT  run the body, then the head: the top-k candidates for the next token
    bench PROMPT       the same generation timed with and without the KV cache
    tour               generate, arch, next-token and bench in order, each with a one-line explanation
    step PROMPT        decode one token at a time, choosing among the top-k yourself
    lens PROMPT        the logit lens: what each layer would predict if it were the last
    attention PROMPT   the attention probabilities as a heatmap (PNG; needs matplotlib)
    compare            this model and transformers' on the same weights, intermediate by intermediate

Every command takes --model (a folder, a Hugging Face repo id, or `tiny`: a small model that
ships with this package, see scripts/train_tiny.py), --device and --dtype.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import Phi3Error
from .generation import check_sampling, generate, stream_tokens
from .config import Phi3Config
from .loading import CONFIG_FILES, resolve_checkpoint, resolve_device, resolve_dtype, weight_bytes
from .model import Phi3ForCausalLM
from .quantize import LINEAR, METHODS, method_to_load, use_quantized_modules
from .tokenizer import Tokenizer

DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
TOUR_PROMPT = "What does the KV cache do?"  # a question of the tiny model's corpus (scripts/tiny_corpus.txt)
BAR = "{desc} [{bar:30}] {n_fmt}/{total_fmt}{unit}"  # tqdm's bar, as the load shows it
TOKENIZER_MODELS = ("tokenizer.model", "tokenizer.json")  # Phi-3's sentencepiece model, Phi-4's BPE
COMPARE_PROMPT = "The KV cache keeps the keys and values of earlier tokens."


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


# ------------------------------------------------------------------------------------ loading


def model_folder(args):
    return resolve_checkpoint(args.model)  # a repo id downloads here, with huggingface-hub's bars


def model_config(args) -> Phi3Config:
    """The config of --model, without its weights: a Phi-3 family repo id needs no download at all
    (family.py knows its config); another repo id downloads only its config files."""
    from .family import config as family_config, find

    if not Path(args.model).expanduser().is_dir() and find(args.model):
        return family_config(args.model)
    return Phi3Config.from_pretrained(resolve_checkpoint(args.model, CONFIG_FILES))


def meta_model(args) -> Phi3ForCausalLM:
    """The model of --model with shapes and dtypes but no weights (the meta device): for `arch`."""
    config = model_config(args)
    dtype = resolve_dtype(args.dtype or "auto", torch.device("cpu"), saved_dtype(config))  # the checkpoint's, unless --dtype says
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
        raise Phi3Error(f"--max-new-tokens {args.max_new_tokens}: more new tokens than the model has positions "
                        f"({config.max_position_embeddings}), prompt included")
    return config


def load(args) -> tuple[Phi3ForCausalLM, Tokenizer]:
    start = time.perf_counter()
    local = Path(args.model).expanduser()
    config = check_max_new_tokens(args)  # reads the config: a folder that is no checkpoint says so here
    # The tokenizer first (for a repo id, its files only): one that cannot be read fails in seconds,
    # before gigabytes of weights download.
    if not args.tokenizer and local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_MODELS):
        raise Phi3Error(f"{local / 'tokenizer.model'} not found, and no tokenizer.json: {args.model} holds no "
                        "tokenizer (model.save_pretrained writes none); give one with --tokenizer DIR (or a repo "
                        "id, or 'tiny')")
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
            bars.append(tqdm(total=total, desc="  weights", unit=" tensors", file=sys.stderr, mininterval=every,
                             bar_format=BAR))
        bars[0].update(done - bars[0].n)

    try:
        model = Phi3ForCausalLM.from_pretrained(folder, device=args.device, dtype=args.dtype, progress=progress,
                                                attention=args.attention, quantize=args.quantize)
    finally:
        for bar in bars:
            bar.close()
    weight = model.model.embed_tokens.weight
    kind = f"{model.config.quantization} matrices, {weight.dtype} otherwise" if model.config.quantization else weight.dtype
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
            hint += ("; " if not hint else ", ") + ("--quantize int8 takes about a quarter of fp32, int4 a sixth "
                                                    "(fastest with --compile)")
        log(f"the weights take {size / 1e9:.1f} GB of memory in {str(dtype).removeprefix('torch.')} on the CPU{hint}")


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
        for token in stream_tokens(model, ids, args.max_new_tokens, use_cache=not args.no_cache, eos_token_id=stops,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                   compile=args.compile):
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


# ----------------------------------------------------------------------------------- commands


def cmd_generate(args) -> None:
    model, tokenizer = load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)
    stream_text(model, tokenizer, ids, args)


CHAT_HELP = ("/help this list; /clear (or /reset) forgets the conversation; /quit (or /bye, /exit, Ctrl-D) "
             "leaves; Ctrl-C stops a reply, or clears the line being typed")


def cmd_chat(args) -> None:
    model, tokenizer = load(args)
    try:
        import readline  # input() then edits the line and keeps a history (Up arrow) in a terminal
    except ImportError:  # not on every platform
        readline = None
    log(f"chat: type a message. {CHAT_HELP}")
    history: list[dict] = []
    limit = model.config.max_position_embeddings + 1 - args.max_new_tokens  # room for the prompt (the last token is not fed back)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # as in a shell: the line is dropped, the chat goes on
            print()
            continue
        if readline is not None and line:
            readline.add_history(line)
        if line in ("/quit", "/bye", "/exit"):
            return
        if line in ("/clear", "/reset"):
            history = []
            log("(conversation forgotten)")
            continue
        if line == "/help":
            log(CHAT_HELP)
            continue
        if line.startswith("/") and " " not in line:
            log(f"unknown command {line}: {CHAT_HELP}")
            continue
        if not line:
            continue
        turn = history + [{"role": "user", "content": line}]
        ids = tokenizer.encode(tokenizer.apply_chat_template(turn))
        while len(ids) > limit and len(turn) > 1:  # forget the oldest exchange until it fits
            turn = turn[2:]
            ids = tokenizer.encode(tokenizer.apply_chat_template(turn))
        if len(ids) > limit:
            log(f"error: that message is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} at most "
                f"{limit} fit in the model's {model.config.max_position_embeddings} positions. Try a shorter one.")
            continue
        print("assistant> ", end="", flush=True)
        reply: list[int] = []
        try:
            stream_text(model, tokenizer, torch.tensor([ids], device=model.lm_head.weight.device), args, reply)
        except KeyboardInterrupt:
            log("[reply stopped]")  # the conversation goes on with the part that was written
        history = turn + [{"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)}]


def cmd_arch(args, model=None) -> None:
    """The module tree and sizes; without a loaded model, from the config alone (no weights read)."""
    model = model or meta_model(args)
    c = model.config
    print(model)
    layers = model.model.layers
    parts = {
        "embed_tokens": model.model.embed_tokens.weight.numel(),
        "attention (qkv_proj, o_proj)": sum(count(layer.self_attn) for layer in layers),
        "mlp (gate_up_proj, down_proj)": sum(count(layer.mlp) for layer in layers),
        "norms": sum(p.numel() for n, p in model.named_parameters() if "norm" in n),
        "lm_head": 0 if c.tie_word_embeddings else count(model.lm_head),
    }
    total = count(model)
    print(f"\n{'part':34s}{'parameters':>16s}{'share':>8s}")
    for name, n in parts.items():
        note = "  (tied: the embedding matrix)" if name == "lm_head" and c.tie_word_embeddings else ""
        print(f"{name:34s}{n:>16,}{n / total:>8.1%}{note}")
    print(f"{'total':34s}{total:>16,}")
    element = model.model.embed_tokens.weight.element_size()  # the KV cache's dtype, the model's
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element  # k and v
    size = weight_bytes(model)
    kind = f" ({c.quantization} matrices, scales and the rest)" if c.quantization else ""
    print(f"\nweights: {size / 1e9:.3f} GB ({size / 2**30:.3f} GiB) in {model.model.embed_tokens.weight.dtype}{kind}")
    print(f"KV cache: {per_token / 1024:.1f} KiB per token (2 x {c.num_hidden_layers} layers x "
          f"{c.num_key_value_heads} kv heads x {c.head_dim} x {element} B); "
          f"{per_token * c.max_position_embeddings / 2**30:.3f} GiB for all {c.max_position_embeddings} positions")


def cmd_next_token(args, loaded=None) -> None:
    model, tokenizer = loaded or load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)
    with torch.no_grad():
        hidden = model.model(ids)  # the body: (1, T, hidden)
        logits = model.lm_head(hidden[:, -1]).float()[0]  # the head, last position only: (V,)
    probs = logits.softmax(-1)
    top = logits.topk(min(args.top_k, logits.numel()))
    print(f"hidden state {tuple(hidden.shape)} -> logits {tuple(logits.shape)}; argmax: {int(logits.argmax())}")
    print(f"{'rank':>4s} {'id':>7s}  {'token':20s}{'logit':>9s}{'prob':>9s}")
    for rank, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>4d} {token:>7d}  {tokenizer.id_to_piece(token)!r:20s}{value:>9.3f}{probs[token].item():>9.2%}")


def cmd_bench(args, loaded=None) -> None:
    if getattr(args, "vs_transformers", False):
        return bench_vs_transformers(args)
    if getattr(args, "prefill", None) is not None:  # would be ignored
        raise Phi3Error("--prefill times a forward pass against transformers': it goes with --vs-transformers")
    model, tokenizer = loaded or load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)
    ways = {"with KV cache": dict(use_cache=True), "without cache": dict(use_cache=False)}
    if getattr(args, "compile", False):
        ways["cache, compiled"] = dict(use_cache=True, compile=True)
    # One untimed run of each way first: a first call pays for allocations and kernel choices.
    # A short one will do, except compiled: it compiles for the cache length the timed runs use.
    for way, options in ways.items():
        warm_up = args.max_new_tokens if options.get("compile") else min(args.max_new_tokens, 8)
        generate(model, ids, warm_up, eos_token_id=[], **options)
    times = {way: [] for way in ways}
    for run in range(args.runs):  # alternate, so that every way sees the same machine conditions
        for way, options in ways.items():
            start = time.perf_counter()
            out = generate(model, ids, args.max_new_tokens, eos_token_id=[], **options)
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            times[way].append(time.perf_counter() - start)
    new = out.shape[1] - ids.shape[1]
    print(f"{new} new tokens after a {ids.shape[1]}-token prompt, {args.runs} run{'s' * (args.runs != 1)} each, stop tokens ignored")
    for way in ways:
        median = statistics.median(times[way])
        print(f"{way:15s} median {median:8.3f} s  {new / median:8.1f} tokens/s  "
              f"(runs: {', '.join(f'{t:.3f}' for t in times[way])})")
    print(f"the cache is {statistics.median(times['without cache']) / statistics.median(times['with KV cache']):.1f}x faster")


def bench_vs_transformers(args) -> None:
    """phi3_scratch.benchmark on this model's checkpoint: ours and transformers', side by side."""
    from . import benchmark

    require_transformers("bench --vs-transformers")
    chosen = [flag for flag, given in (("--quantize", args.quantize), ("--attention", args.attention != "eager"),
                                       ("--compile", args.compile)) if given]
    if chosen:
        raise Phi3Error(f"bench --vs-transformers times every variant itself (this model eager, sdpa, compiled, int8 "
                        f"and compiled int8; transformers' eager, sdpa and compiled): drop {', '.join(chosen)}")
    check_max_new_tokens(args)
    folder = model_folder(args)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or folder)
    tokens = len(encode_prompt(tokenizer, args.prompt, args.chat, "cpu")[0])
    argv = ["--checkpoint", str(folder), "--device", args.device, "--runs", str(args.runs),
            "--new-tokens", str(args.max_new_tokens), "--prompt-len", str(tokens), "--prefill",
            *map(str, [512] if args.prefill is None else args.prefill)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    print(f"phi3_scratch and transformers on {folder}: a random prompt of {tokens} tokens (as long as PROMPT), "
          f"{args.max_new_tokens} new tokens; one JSON line per measurement", flush=True)
    benchmark.main(argv)


# The teaching notebook's own prompts (Rioplatense Spanish), which the tour uses on a real checkpoint.
NOTEBOOK_PROMPTS = {
    "generate": "Mandale un mensajito a Juan pidiéndole perdón por haberle pisado el pie en el bondi. "
                "Explicale qué pasó, pero sin chamuyo.",
    "next_token": "La universidad más prestigiosa del mundo es la Universidad de",
    "timing": "Escribe una carta muy larga explicando por qué el asado del domingo se quemó. Describe qué salió mal.",
}


def cmd_tour(args) -> None:
    """The notebook's steps in order. On a real checkpoint, with the notebook's prompts as it sends
    them (no chat template; 200 new tokens, then 100 for the timing); the tiny model, which knows
    only its corpus, gets questions it can answer, in the chat template."""
    tiny = args.model == "tiny"
    step = lambda **changes: argparse.Namespace(**{**vars(args), **changes})  # args for one step
    print("== 1. Load: the config, then each weight tensor, straight onto the device ==")
    model, tokenizer = load(args)
    device = model.lm_head.weight.device
    prompt = args.prompt or (TOUR_PROMPT if tiny else NOTEBOOK_PROMPTS["generate"])
    template = "in the chat template" if tiny else "as it is (no chat template)"
    how = f"sampled at temperature {args.temperature:g}" if args.temperature > 0 else "greedy"
    print(f"\n== 2. Generate: {prompt!r} {template}, {how}, {args.max_new_tokens} new tokens, only the new text ==")
    stream_text(model, tokenizer, encode_prompt(tokenizer, prompt, tiny, device), args)
    print("\n== 3. Architecture: embedding, decoder layers (attention + MLP), final norm, head ==")
    cmd_arch(args, model)
    print("\n== 4. Next token: run the body (model.model), then the head (lm_head) on the last position ==")
    next_prompt = prompt if tiny else NOTEBOOK_PROMPTS["next_token"]
    cmd_next_token(step(prompt=next_prompt, top_k=5, chat=tiny), (model, tokenizer))
    print("\n== 5. KV cache: the same generation timed with and without it ==")
    timing = step(prompt=prompt, chat=True, max_new_tokens=min(args.max_new_tokens, 50)) if tiny else \
        step(prompt=NOTEBOOK_PROMPTS["timing"], chat=False, max_new_tokens=100)
    cmd_bench(timing, (model, tokenizer))


def ask() -> str:
    try:
        return input("> ").strip()
    except EOFError:  # Ctrl-D, or the end of piped input
        return "q"


def cmd_step(args) -> None:
    from .stepping import Stepper

    model, tokenizer = load(args)
    prompt = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)[0].tolist()
    stepper = Stepper(model, prompt, tokenizer=tokenizer, top_k=args.top_k, max_new_tokens=args.max_new_tokens)
    stops = stop_ids(model, tokenizer)
    print("Enter takes the most likely token, a number picks that candidate, q quits.")
    record = stepper.record()

    def show(record) -> None:
        print(f"\nposition {record.position}, KV cache holds {record.cache_length} positions; candidates:")
        for n, c in enumerate(record.candidates):
            print(f"  [{n}] {c.token_id:>6d}  {c.text!r:20s} logit {c.logit:8.3f}  prob {c.prob:6.1%}")

    while len(stepper.ids) < stepper.cache.max_len:  # room for max_new_tokens
        show(record)
        answer = ask()
        while answer not in ("", "q") and not (digits(answer) and int(answer) < len(record.candidates)):
            log(f"expected Enter, q or a number 0..{len(record.candidates) - 1}, got {answer!r}")
            answer = ask()
        if answer == "q":
            break
        chosen = record.candidates[int(answer) if answer else 0].token_id
        record = stepper.choose(chosen)
        print("text: " + tokenizer.decode(stepper.ids[len(prompt):], skip_special_tokens=False))
        if chosen in stops:
            print("(that is a stop token: generate would end here)")
    else:  # the next token's candidates are still known; choosing one would feed it in
        show(record)
        print("\n(no room left to choose: --max-new-tokens reached, or the model's context is full)")
    chosen = len(stepper.ids) - len(prompt)
    print(f"\n{chosen} token{'s' * (chosen != 1)} chosen: {stepper.ids[len(prompt):]}")


def cmd_lens(args) -> None:
    from .tracing import logit_lens

    model, tokenizer = load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)
    lens = logit_lens(model, ids, all_positions=args.all_positions)[:, 0]  # (layers, [T,] V)
    piece = lambda i: repr(tokenizer.id_to_piece(i))
    if not args.all_positions:
        probs = lens.softmax(-1)  # (layers, V)
        final = int(lens[-1].argmax())
        print(f"last position ({ids.shape[1] - 1}); the model's prediction is {final} {piece(final)}")
        print(f"{'layer':>5s}  {'top token':24s}{'prob':>8s}   prob of {piece(final)}")
        for layer in range(lens.shape[0]):
            top = int(lens[layer].argmax())
            print(f"{layer:>5d}  {f'{top} {piece(top)}':24s}{probs[layer, top]:>8.1%}   {probs[layer, final]:>8.1%}")
        return
    tops = lens.argmax(-1).tolist()  # (layers, T): each layer's top token at each position
    tokens = ids[0].tolist()
    width = max(8, *(len(piece(t)) + 1 for t in tokens + [t for row in tops for t in row]))
    print("top token of each layer (rows) at each position (columns: the input token there)")
    print(f"{'':>5s}  " + "".join(f"{piece(t):>{width}s}" for t in tokens))
    for layer, row in enumerate(tops):
        print(f"{layer:>5d}  " + "".join(f"{piece(t):>{width}s}" for t in row))


def cmd_attention(args) -> None:
    from .plotting import attention_figure, attention_maps, check_png_path, need_matplotlib, save_attention_png
    from .tracing import trace

    check_png_path(args.out, "--out")  # the picture's name and matplotlib, before the weights load
    need_matplotlib()
    if args.layer != "all" and not digits(args.layer):
        raise Phi3Error(f"--layer must be a layer number or 'all', got {args.layer!r}")
    layer = "all" if args.layer == "all" else int(args.layer)
    config = model_config(args)  # --layer and --head are checked before the weights load
    if layer != "all" and layer >= config.num_hidden_layers:
        raise Phi3Error(f"--layer {layer}: the model has {config.num_hidden_layers} layers, 0..{config.num_hidden_layers - 1}")
    if args.head is not None and layer == "all":
        raise Phi3Error("--head goes with one layer: --layer all draws every layer's heads averaged; "
                        "give --layer N to see one head")
    if args.head is not None and not 0 <= args.head < config.num_attention_heads:
        raise Phi3Error(f"--head {args.head}: the model has {config.num_attention_heads} heads a layer, "
                        f"0..{config.num_attention_heads - 1}")
    model, tokenizer = load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)
    with torch.no_grad(), trace(model, only={"attn_probs"}) as t:
        model(ids)
    labels = [tokenizer.id_to_piece(i) for i in ids[0].tolist()]
    maps = attention_maps(t, layer, args.head)
    width, height = save_attention_png(attention_figure(maps, labels, labels), args.out)
    print(f"wrote {args.out} ({width}x{height} pixels): {', '.join(title for title, _ in maps)}")


def cmd_compare(args) -> None:
    from .tracing import compare_with_transformers, default_tolerance, format_comparison

    transformers = require_transformers("compare")
    saved = model_config(args).quantization
    if saved:  # transformers would read the integers as weights and drop the scales
        raise Phi3Error(f"compare: {args.model} is a checkpoint saved {saved}, which transformers cannot read; "
                        f"compare the full-precision checkpoint it came from, with --quantize {saved}")
    model, tokenizer = load(args)
    weight = model.model.embed_tokens.weight
    log(f"loading transformers' Phi3ForCausalLM (eager attention) from the same folder, {weight.dtype}")
    hf = transformers.Phi3ForCausalLM.from_pretrained(model_folder(args), dtype=weight.dtype,
                                                      attn_implementation="eager").to(weight.device).eval()
    if model.config.quantization:
        log(f"note: this model's matrices are {model.config.quantization} and transformers' are not: "
            "the differences below include the quantization's")
    ids = encode_prompt(tokenizer, args.prompt, args.chat, weight.device)
    tolerance = default_tolerance(weight.dtype) if args.tolerance is None else args.tolerance
    print(f"{ids.shape[1]} tokens, {weight.dtype} on {weight.device}")
    rows = compare_with_transformers(model, hf, ids, tolerance)
    print(format_comparison(rows, tolerance))
    return 0 if all(r["ok"] for r in rows) else 1  # like diff: 1 when they disagree


def require_transformers(command: str):
    """The transformers module, or a Phi3Error saying that `command` needs it."""
    try:
        import transformers
    except ImportError:
        raise Phi3Error(f"{command} runs transformers beside this model, and transformers is not installed: "
                        "pip install transformers") from None
    return transformers


# --------------------------------------------------------------------------------------- main


def check_device(device: str) -> None:
    """--device in the command line's words: cpu, cuda, cuda:N, or mps where torch has it."""
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise Phi3Error(f"--device {device}: this machine has no Apple GPU that torch can use "
                        f"(torch {torch.__version__}); use --device cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Phi3Error(f"--device {device}: this machine has no CUDA GPU that torch can use "
                        f"(torch {torch.__version__}); use --device cpu")
    try:
        resolve_device(device)
    except Phi3Error:
        raise Phi3Error(f"--device {device}: not a device this model runs on; expected cpu, cuda, cuda:N or mps") from None


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("phi3-scratch")
    except PackageNotFoundError:
        return "(not installed: run from the source tree)"


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help=f"folder, repo id or 'tiny' (default {DEFAULT_MODEL})")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:N or mps (default: cuda when there is one, else cpu)")
    common.add_argument("--dtype", default=None,
                        help="bf16, fp16 or fp32, or auto: the checkpoint's (bf16 for Phi-3). Default: the "
                             "checkpoint's on a GPU, fp32 on the CPU")
    common.add_argument("--attention", default="eager", choices=["eager", "sdpa"],
                        help="eager: written out step by step (default); sdpa: torch's fused kernel")
    common.add_argument("--quantize", default=None, choices=METHODS,
                        help="int8: int8 weights with one scale per output channel, half of bf16's memory; "
                             "int4: 4-bit weights in groups of 128 inputs, a quarter")
    common.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="the tokenizer's folder or repo id, for a checkpoint without tokenizer files")
    gen = Parser(add_help=False)
    gen.add_argument("-n", "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=positive_int, default=200,
                     help="at most this many new tokens (default 200)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 is greedy; the default is greedy, or 1.0 when --top-k, --top-p or --seed is given")
    gen.add_argument("--top-k", type=positive_int, default=None, help="sample (with --temperature) among the k likeliest")
    gen.add_argument("--top-p", type=float, default=None, help="sample (with --temperature) within probability p")
    gen.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step (torch.compile; a CUDA graph on a GPU): faster after a warm-up")
    chat = Parser(add_help=False)
    chat.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    prompt = Parser(add_help=False)
    prompt.add_argument("prompt", nargs="?", default=None, help="the prompt; - reads it from standard input (less the newline that ends it)")
    prompt.add_argument("-p", "--prompt", dest="prompt_flag", metavar="PROMPT", default=None,
                        help="the prompt, as an option (instead of the argument)")

    parser = Parser(prog="phi3-scratch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"phi3-scratch {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("generate", parents=[common, gen, chat, prompt], help="continue a prompt")
    sub.add_parser("chat", parents=[common, gen], help="talk to the model")
    sub.add_parser("arch", parents=[common], help="module tree and sizes")
    p = sub.add_parser("next-token", parents=[common, chat, prompt], help="top-k candidates for the next token")
    p.add_argument("--top-k", type=positive_int, default=10, help="how many candidates to list (default 10)")
    p = sub.add_parser("bench", parents=[common, chat, prompt], help="time generation with and without the KV cache")
    p.add_argument("-n", "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=positive_int, default=100,
                   help="new tokens a timed generation makes (default 100)")
    p.add_argument("--runs", type=positive_int, default=3, help="timed runs of each way; the median is shown (default 3)")
    p.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    p.add_argument("--vs-transformers", action="store_true",
                   help="instead: this model against transformers' on the same checkpoint, one JSON line per figure")
    p.add_argument("--prefill", type=positive_int, nargs="*", default=None,
                   help="with --vs-transformers: prompt lengths whose forward pass is timed (default 512)")
    p = sub.add_parser("tour", parents=[common, gen], help="the whole notebook, in order")
    p.add_argument("-p", "--prompt", default=None,
                   help="the generation step's prompt (default: the notebook's; for --model tiny, a question it knows)")
    p.add_argument("--runs", type=positive_int, default=5,
                   help="timed runs of the KV-cache step, after an untimed one; the median is shown (default 5)")
    p = sub.add_parser("step", parents=[common, chat, prompt], help="decode one token at a time, your choice")
    p.add_argument("--top-k", type=positive_int, default=5, help="candidates shown at each step (default 5)")
    p.add_argument("-n", "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=positive_int, default=200,
                   help="at most this many steps (default 200)")
    p = sub.add_parser("lens", parents=[common, chat, prompt], help="the logit lens: each layer's best guess")
    p.add_argument("--all-positions", action="store_true", help="a table of every position, not just the last")
    p = sub.add_parser("attention", parents=[common, chat, prompt], help="attention heatmap as a PNG")
    p.add_argument("--layer", default="0", help="a layer number, or 'all' for every layer's mean over heads")
    p.add_argument("--head", type=int, default=None, help="one head (default: every head of the layer)")
    p.add_argument("--out", default="attention.png", help="the PNG file to write (default attention.png)")
    p = sub.add_parser("compare", parents=[common, chat], help="every intermediate against transformers")
    p.add_argument("--prompt", default=COMPARE_PROMPT, help=f"the input both models run; - reads standard input "
                                                             f"(default {COMPARE_PROMPT!r})")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest relative difference accepted (default 1e-5 in fp32, 2e-2 in bf16/fp16)")
    return parser


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "arch": cmd_arch, "next-token": cmd_next_token,
            "bench": cmd_bench, "tour": cmd_tour, "step": cmd_step, "lens": cmd_lens, "attention": cmd_attention,
            "compare": cmd_compare}


def resolve_prompt(args) -> None:
    """PROMPT as a positional or as -p/--prompt (not both); '-' reads it from standard input."""
    flag = getattr(args, "prompt_flag", None)
    if flag is not None and args.prompt is not None:
        raise Phi3Error(f"the prompt was given twice: as PROMPT {args.prompt!r:.40} and as -p {flag!r:.40}; give one")
    args.prompt = flag if flag is not None else args.prompt
    if args.prompt is None:
        raise Phi3Error(f"{args.command} needs a PROMPT: as an argument, with -p, or '-' to read standard input")
    if args.prompt == "-":
        if args.command == "step":  # its answers come from standard input: a prompt there would use them up
            raise Phi3Error("step reads its choices from standard input: give the prompt as an argument or with -p, not '-'")
        args.prompt = read_stdin()


def read_stdin() -> str:
    """The prompt piped in, without the one newline that ends it (`echo text |` adds one): a newline
    is a token, and the model would continue after it."""
    text = sys.stdin.read()
    return text.removesuffix("\n").removesuffix("\r")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # every flag is checked here, before minutes of loading
        if "prompt_flag" in args:
            resolve_prompt(args)
        elif getattr(args, "prompt", None) == "-":  # compare and tour: --prompt - reads standard input too
            args.prompt = read_stdin()
        if "model" in args and not args.model.strip():
            raise Phi3Error("--model is empty: give a checkpoint folder, a Hugging Face repo id or 'tiny'")
        if "prompt" in args and args.prompt is not None and not args.prompt.strip():
            raise Phi3Error("PROMPT is empty: give some text to continue")
        if "temperature" in args:
            given = args.temperature  # None: not given
            args.temperature = 0.0 if given is None else given
            check_sampling(args.temperature, args.top_k, args.top_p, args.seed, flags=True)
            sampling = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
                        if value is not None]
            if sampling and given is None:
                verb = "matters" if len(sampling) == 1 else "matter"
                log(f"note: {', '.join(sampling)} only {verb} when sampling: sampling with --temperature 1.0")
                args.temperature = 1.0
            elif sampling and given == 0:
                log(f"note: --temperature 0 is greedy, which ignores {', '.join(sampling)}")
                args.top_k = args.top_p = args.seed = None
        if getattr(args, "tolerance", None) is not None and not 0 < args.tolerance < float("inf"):
            raise Phi3Error(f"--tolerance must be a positive number, got {args.tolerance}")
        check_device(args.device)
        if args.dtype is not None:
            try:
                resolve_dtype(args.dtype.lower(), torch.device("cpu"), torch.float32)
            except Phi3Error:
                raise Phi3Error(f"--dtype {args.dtype}: not a dtype this model runs in; expected bf16, fp16 or fp32 "
                                "(or bfloat16, float16, float32, half), or auto for the checkpoint's") from None
            args.dtype = args.dtype.lower()
        if getattr(args, "compile", False) and getattr(args, "no_cache", False):
            raise Phi3Error("--compile compiles the cached decode step; it cannot be combined with --no-cache")
        code = COMMANDS[args.command](args)  # None for 0; compare returns 1 when it finds a difference
    except Phi3Error as e:  # exit status 2, as for a mistyped flag (argparse) and diff's trouble
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`| head`): end quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that Python's own flush at exit has somewhere to write
        return 128 + signal.SIGPIPE  # 141: the status of a tool that SIGPIPE ended
    except OSError as e:  # a cache folder that cannot be written, a full disk, ...
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return 130
    return code or 0
