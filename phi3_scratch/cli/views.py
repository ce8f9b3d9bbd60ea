"""`explore` and `serve`: one forward pass drawn in the browser, as a file or live."""

from __future__ import annotations

from ..errors import Phi3Error
from .common import load, log

SERVE_PROMPT = "The KV cache"  # the live page's first prompt, until the learner types another


def cmd_explore(args) -> None:
    from ..explore import explore

    if not args.out.lower().endswith((".html", ".htm")):  # before the weights load
        raise Phi3Error(f"--out must be a file name ending in .html (view.html, say), got {args.out!r}")
    model, tokenizer = load(args)
    path = explore(model, tokenizer, args.prompt, chat=args.chat, name=args.model).save(args.out)
    size = path.stat().st_size / 1e6
    print(f"wrote {path} ({size:.2f} MB): open it in a browser; nothing in it is fetched")


def cmd_serve(args) -> None:
    from ..serve import Explorer, make_server

    model, tokenizer = load(args)
    explorer = Explorer(model, tokenizer, args.model, args.prompt or SERVE_PROMPT, args.chat)
    server = make_server(explorer, args.host, args.port)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"note: listening on {host}, not only on this machine: anyone who can reach port {port} can run "
            "the model")
    print(f"serving the explore view on http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/ "
          "(Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
