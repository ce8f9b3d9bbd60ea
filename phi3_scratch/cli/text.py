"""`generate` and `chat`: the model's text, streamed as it is made."""

from __future__ import annotations

import torch

from .common import encode_prompt, load, log, stream_text


CHAT_HELP = ("/help this list; /clear (or /reset) forgets the conversation; /quit (or /bye, /exit, Ctrl-D) "
             "leaves; Ctrl-C stops a reply, or clears the line being typed")


def cmd_generate(args) -> None:
    model, tokenizer = load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)
    stream_text(model, tokenizer, ids, args)


def cmd_chat(args) -> None:
    model, tokenizer = load(args)
    try:
        import readline  # input() then edits the line and keeps a history (Up arrow) in a terminal
    except ImportError:  # not on every platform
        readline = None
    log(f"chat: type a message. {CHAT_HELP}")
    history: list[dict] = []
    # room for the prompt (the last token is not fed back)
    limit = model.config.max_position_embeddings + 1 - args.max_new_tokens
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
            log(f"error: that message is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} "
                f"at most {limit} fit in the model's {model.config.max_position_embeddings} positions. "
                "Try a shorter one.")
            continue
        print("assistant> ", end="", flush=True)
        reply: list[int] = []
        try:
            stream_text(model, tokenizer, torch.tensor([ids], device=model.lm_head.weight.device),
                        args, reply)
        except KeyboardInterrupt:
            log("[reply stopped]")  # the conversation goes on with the part that was written
        history = turn + [{"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)}]
