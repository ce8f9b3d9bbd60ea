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
    explore PROMPT     one forward pass drawn in a browser: a self-contained HTML file
    serve              the same view, live, with an Ablate control (127.0.0.1 by default)

Every command takes --model (a folder, a Hugging Face repo id, or `tiny`: a small model that
ships with this package, see scripts/train_tiny.py), --device and --dtype.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

from ..errors import Phi3Error
from ..generation import check_sampling
from ..loading import resolve_device, resolve_dtype
from ..quantize import METHODS
from .anatomy import cmd_arch, cmd_next_token
from .common import DEFAULT_MODEL, Parser, log, positive_int
from .inside import COMPARE_PROMPT, cmd_attention, cmd_compare, cmd_lens, cmd_step
from .text import cmd_chat, cmd_generate
from .timing import cmd_bench, cmd_tour
from .views import cmd_explore, cmd_serve


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
        raise Phi3Error(f"--device {device}: not a device this model runs on; "
                        "expected cpu, cuda, cuda:N or mps") from None


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("phi3-scratch")
    except PackageNotFoundError:
        return "(not installed: run from the source tree)"


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"folder, repo id or 'tiny' (default {DEFAULT_MODEL})")
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
    gen.add_argument("-n", "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=positive_int,
                     default=200, help="at most this many new tokens (default 200)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 is greedy; the default is greedy, "
                          "or 1.0 when --top-k, --top-p or --seed is given")
    gen.add_argument("--top-k", type=positive_int, default=None,
                     help="sample (with --temperature) among the k likeliest")
    gen.add_argument("--top-p", type=float, default=None,
                     help="sample (with --temperature) within probability p")
    gen.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step (torch.compile; a CUDA graph on a GPU): "
                          "faster after a warm-up")
    chat = Parser(add_help=False)
    chat.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    prompt = Parser(add_help=False)
    prompt.add_argument("prompt", nargs="?", default=None,
                        help="the prompt; - reads it from standard input (less the newline that ends it)")
    prompt.add_argument("-p", "--prompt", dest="prompt_flag", metavar="PROMPT", default=None,
                        help="the prompt, as an option (instead of the argument)")

    parser = Parser(prog="phi3-scratch", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"phi3-scratch {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("generate", parents=[common, gen, chat, prompt], help="continue a prompt")
    sub.add_parser("chat", parents=[common, gen], help="talk to the model")
    sub.add_parser("arch", parents=[common], help="module tree and sizes")
    p = sub.add_parser("next-token", parents=[common, chat, prompt],
                       help="top-k candidates for the next token")
    p.add_argument("--top-k", type=positive_int, default=10, help="how many candidates to list (default 10)")
    p = sub.add_parser("bench", parents=[common, chat, prompt],
                       help="time generation with and without the KV cache")
    p.add_argument("-n", "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=positive_int,
                   default=100, help="new tokens a timed generation makes (default 100)")
    p.add_argument("--runs", type=positive_int, default=3,
                   help="timed runs of each way; the median is shown (default 3)")
    p.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    p.add_argument("--vs-transformers", action="store_true",
                   help="instead: this model against transformers' on the same checkpoint, "
                        "one JSON line per figure")
    p.add_argument("--prefill", type=positive_int, nargs="*", default=None,
                   help="with --vs-transformers: prompt lengths whose forward pass is timed (default 512)")
    p = sub.add_parser("tour", parents=[common, gen], help="the whole notebook, in order")
    p.add_argument("-p", "--prompt", default=None,
                   help="the generation step's prompt "
                        "(default: the notebook's; for --model tiny, a question it knows)")
    p.add_argument("--runs", type=positive_int, default=5,
                   help="timed runs of the KV-cache step, after an untimed one; "
                        "the median is shown (default 5)")
    p = sub.add_parser("step", parents=[common, chat, prompt], help="decode one token at a time, your choice")
    p.add_argument("--top-k", type=positive_int, default=5, help="candidates shown at each step (default 5)")
    p.add_argument("-n", "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=positive_int,
                   default=200, help="at most this many steps (default 200)")
    p = sub.add_parser("lens", parents=[common, chat, prompt], help="the logit lens: each layer's best guess")
    p.add_argument("--all-positions", action="store_true",
                   help="a table of every position, not just the last")
    p = sub.add_parser("attention", parents=[common, chat, prompt], help="attention heatmap as a PNG")
    p.add_argument("--layer", default="0", help="a layer number, or 'all' for every layer's mean over heads")
    p.add_argument("--head", type=int, default=None, help="one head (default: every head of the layer)")
    p.add_argument("--out", default="attention.png", help="the PNG file to write (default attention.png)")
    p = sub.add_parser("compare", parents=[common, chat], help="every intermediate against transformers")
    p.add_argument("--prompt", default=COMPARE_PROMPT,
                   help=f"the input both models run; - reads standard input (default {COMPARE_PROMPT!r})")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest relative difference accepted (default 1e-5 in fp32, 2e-2 in bf16/fp16)")
    p = sub.add_parser("explore", parents=[common, chat, prompt], help="one forward pass, drawn in a browser")
    p.add_argument("--out", default="explore.html", help="the HTML file to write (default explore.html)")
    p = sub.add_parser("serve", parents=[common, chat], help="the explore view, live, with an Ablate control")
    p.add_argument("-p", "--prompt", default=None, help="the first prompt the page shows")
    p.add_argument("--port", type=int, default=8000,
                   help="the port to listen on (default 8000; 0: any free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only)")
    return parser


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "arch": cmd_arch, "next-token": cmd_next_token,
            "bench": cmd_bench, "tour": cmd_tour, "step": cmd_step, "lens": cmd_lens,
            "attention": cmd_attention, "compare": cmd_compare, "explore": cmd_explore, "serve": cmd_serve}


def resolve_prompt(args) -> None:
    """PROMPT as a positional or as -p/--prompt (not both); '-' reads it from standard input."""
    flag = getattr(args, "prompt_flag", None)
    if flag is not None and args.prompt is not None:
        raise Phi3Error(f"the prompt was given twice: as PROMPT {args.prompt!r:.40} "
                        f"and as -p {flag!r:.40}; give one")
    args.prompt = flag if flag is not None else args.prompt
    if args.prompt is None:
        raise Phi3Error(f"{args.command} needs a PROMPT: as an argument, with -p, "
                        "or '-' to read standard input")
    if args.prompt == "-":
        if args.command == "step":  # its answers come from standard input: a prompt there would use them up
            raise Phi3Error("step reads its choices from standard input: "
                            "give the prompt as an argument or with -p, not '-'")
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
            sampling = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p),
                                                 ("--seed", args.seed))
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
                raise Phi3Error(f"--dtype {args.dtype}: not a dtype this model runs in; "
                                "expected bf16, fp16 or fp32 (or bfloat16, float16, float32, half), "
                                "or auto for the checkpoint's") from None
            args.dtype = args.dtype.lower()
        if getattr(args, "compile", False) and getattr(args, "no_cache", False):
            raise Phi3Error("--compile compiles the cached decode step; "
                            "it cannot be combined with --no-cache")
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
