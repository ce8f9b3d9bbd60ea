"""`step`, `lens`, `attention` and `compare`: the learning tools, from the command line."""

from __future__ import annotations

import torch

from ..errors import Phi3Error
from .common import (digits, encode_prompt, load, log, model_config, model_folder, require_transformers,
                     stop_ids)


COMPARE_PROMPT = "The KV cache keeps the keys and values of earlier tokens."


def ask() -> str:
    try:
        return input("> ").strip()
    except EOFError:  # Ctrl-D, or the end of piped input
        return "q"


def cmd_step(args) -> None:
    from ..stepping import Stepper

    model, tokenizer = load(args)
    prompt = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)[0].tolist()
    stepper = Stepper(model, prompt, tokenizer=tokenizer, top_k=args.top_k,
                      max_new_tokens=args.max_new_tokens)
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
    from ..tracing import logit_lens

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
            print(f"{layer:>5d}  {f'{top} {piece(top)}':24s}{probs[layer, top]:>8.1%}   "
                  f"{probs[layer, final]:>8.1%}")
        return
    tops = lens.argmax(-1).tolist()  # (layers, T): each layer's top token at each position
    tokens = ids[0].tolist()
    width = max(8, *(len(piece(t)) + 1 for t in tokens + [t for row in tops for t in row]))
    print("top token of each layer (rows) at each position (columns: the input token there)")
    print(f"{'':>5s}  " + "".join(f"{piece(t):>{width}s}" for t in tokens))
    for layer, row in enumerate(tops):
        print(f"{layer:>5d}  " + "".join(f"{piece(t):>{width}s}" for t in row))


def cmd_attention(args) -> None:
    from ..plotting import (attention_figure, attention_maps, check_png_path, need_matplotlib,
                            save_attention_png)
    from ..tracing import trace

    check_png_path(args.out, "--out")  # the picture's name and matplotlib, before the weights load
    need_matplotlib()
    if args.layer != "all" and not digits(args.layer):
        raise Phi3Error(f"--layer must be a layer number or 'all', got {args.layer!r}")
    layer = "all" if args.layer == "all" else int(args.layer)
    config = model_config(args)  # --layer and --head are checked before the weights load
    if layer != "all" and layer >= config.num_hidden_layers:
        raise Phi3Error(f"--layer {layer}: the model has {config.num_hidden_layers} layers, "
                        f"0..{config.num_hidden_layers - 1}")
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
    from ..tracing import compare_with_transformers, default_tolerance, format_comparison

    transformers = require_transformers("compare")
    saved = model_config(args).quantization
    if saved:  # transformers would read the integers as weights and drop the scales
        raise Phi3Error(f"compare: {args.model} is a checkpoint saved {saved}, which transformers "
                        f"cannot read; compare the full-precision checkpoint it came from, "
                        f"with --quantize {saved}")
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
