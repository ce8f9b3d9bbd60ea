"""Speed and memory, side by side with transformers, on the same weights, in one process.

    python scripts/bench.py --config small                       # CPU-sized
    python scripts/bench.py --config phi3-mini --device cuda     # Phi-3-mini-4k's shape, bf16
    python scripts/bench.py --checkpoint /path/to/Phi-3-mini-4k-instruct --device cuda
    phi3-scratch bench --vs-transformers --model tiny            # the same, on a CLI model

Weights:
- --config: one set of random weights at the config's real shape, built once in transformers'
  Phi3ForCausalLM. phi3_scratch's model is given the very same tensors, so both read the same memory.
  (Weight values do not change what a forward pass costs.)
- --checkpoint: each library loads the files itself, two copies in memory.

Measures, alternating between the implementations on every run:

    first_token       batch 1, a prompt of --prompt-len tokens, one new token (the prefill)
    decode_cached     the same prompt, --new-tokens greedy tokens, no stopping
    decode_uncached   the same without a KV cache
    prefill_T         one forward pass over T tokens, for each T of --prefill

Implementations:
- transformers: eager, sdpa, and compiled (its static cache and generate's compiled step; cached decode).
- phi3_scratch: eager (every measure), -sdpa (prefill and cached decode), -compiled (cached decode).
- with int8 weights: -int8, -compiled-int8. On request: -compiled-sdpa, -bf16, -int4, -compiled-int4.

Run 0 of each is a warm-up (kernel choice, compilation), reported apart. Stopped by SIGTERM (a
`timeout`), the benchmark reports the runs it finished and skips the profile.

Each measurement prints one JSON line:
- the median of --runs runs, every run, and the ratio to transformers' eager implementation;
- peak memory, and on a GPU the weight-reading bandwidth of decoding (bytes a step reads x tokens/s);
- that bandwidth's fraction of what a device-to-device copy reaches on this card.

--markdown FILE writes the table; --profile FILE writes where a few decode steps spend their time.
Needs transformers (pip install -e ".[test]").
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import traceback
from pathlib import Path

import torch

import phi3_scratch as p3
from phi3_scratch import family
from phi3_scratch.loading import finish_meta_model, set_parameter, weight_bytes
from phi3_scratch.profiling import timed, write_markdown, write_profile

# phi3_scratch's variants and the measures each runs (by name prefix; a variant with None runs all).
DECODE = ("first_token", "decode_cached")
OURS = {"phi3_scratch": None, "phi3_scratch-sdpa": ("prefill_", *DECODE), "phi3_scratch-compiled": DECODE,
        "phi3_scratch-int8": DECODE, "phi3_scratch-compiled-int8": DECODE,
        # not run unless --ours names them: torch's fused attention in the compiled step; bf16 weights
        # (on the CPU, beside fp32 ones)
        "phi3_scratch-compiled-sdpa": DECODE, "phi3_scratch-bf16": DECODE,
        "phi3_scratch-int4": DECODE, "phi3_scratch-compiled-int4": DECODE}
# transformers' variants: its attention implementations, and "compiled": a static cache and generate's
# compiled decode step, the fastest decoding its documentation describes.
THEIRS = ("eager", "sdpa", "compiled")
JOBS = {**OURS, "transformers-compiled": DECODE}  # the measures each variant runs (by name prefix; None: all)
# Phi-3-mini-4k-instruct's shape (3.8B parameters), from the family data; the others scale it down.
MINI = family.official_config("microsoft/Phi-3-mini-4k-instruct")
SMALL = {**MINI, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 8}


# Between small and Phi-3-mini: 1.3 GB of fp32 weights, far more than any CPU cache holds.
MEDIUM = {**MINI, "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 8,
          "num_attention_heads": 12, "num_key_value_heads": 12}


# Small enough that the weights (8 MB) stay in the CPU's caches: per-token overhead, not memory, dominates.
MICRO = {**SMALL, "vocab_size": 2048, "eos_token_id": 2, "pad_token_id": 0, "hidden_size": 256,
         "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 4}


# Small, tied and grouped-query like Phi-4-mini: checks that both models really share one head.
MICRO_TIED = {**MICRO, "num_key_value_heads": 2, "tie_word_embeddings": True}
BUILT_IN = {"small": SMALL, "medium": MEDIUM, "micro": MICRO, "micro-tied": MICRO_TIED, "phi3-mini": MINI}


def config_dict(name: str) -> dict:
    """A built-in shape, or a Phi-3 family member by repo id or name (family.py)."""
    if name in BUILT_IN:
        return dict(BUILT_IN[name])
    if family.find(name) is None:
        raise SystemExit(f"error: --config {name!r}: expected one of {sorted(BUILT_IN)} "
                         f"or a Phi-3 family model, one of {family.repo_ids()}")
    return family.official_config(name)


def build(args, device, dtype):
    """(ours, {name: transformers model}) on the same weights."""
    try:
        import transformers
    except ImportError:
        raise SystemExit("error: the benchmark compares with transformers, which is not installed: "
                         "pip install -e '.[test]'") from None

    if args.checkpoint:
        ours = p3.Phi3ForCausalLM.from_pretrained(args.checkpoint, device=device, dtype=dtype)
        hf = transformers.Phi3ForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(device).eval()
    else:
        d = config_dict(args.config)
        cfg = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")}
        with torch.device("meta"):
            hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg))
        hf = hf.to_empty(device=device).to(dtype).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.02)
                else:
                    p.fill_(1.0)
        if hf.config.tie_word_embeddings:
            hf.lm_head.weight = hf.model.embed_tokens.weight  # to_empty gave the tied head its own storage
        # to_empty left its tables empty
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to(device)
        with torch.device("meta"):
            ours = p3.Phi3ForCausalLM(p3.Phi3Config.from_dict(d))
        for name, p in hf.named_parameters():
            set_parameter(ours, name, p)  # the same tensor, not a copy
        finish_meta_model(ours, device)
        ours.eval()
        theirs = {n: p.data_ptr() for n, p in hf.named_parameters(remove_duplicate=False)}
        shared = all(theirs[n] == p.data_ptr() for n, p in ours.named_parameters(remove_duplicate=False))
        assert shared, "phi3_scratch and transformers must read the very same weight tensors"
    # one set of weights; the kernel is a setting
    models = {f"transformers-{impl}": hf for impl in args.transformers}
    return ours, models


def model_bytes(model) -> tuple[int, int]:
    """(bytes of all the weights, bytes a decode step reads): every weight once, except the embedding
    matrix, of which a step reads one row (not counted; the head tied to it reads it all, counted).
    The KV cache is not counted either (the compiled step reads all of its slots: about 1% more)."""
    weights = weight_bytes(model)
    embed = model.model.embed_tokens.weight
    return weights, weights - (0 if model.config.tie_word_embeddings
                               else embed.numel() * embed.element_size())


def variant(ours, name: str, built: dict | None = None):
    """The model a phi3_scratch variant runs: `ours` itself, or one built from the very same weights,
    int8 or int4 (quantize.py) or in bf16, once for all the variants that run it (kept in `built`)."""
    import dataclasses

    from phi3_scratch.quantize import METHODS, quantize_model

    method = name.rpartition("-")[2]  # "int8", "int4", "bf16" or another part of the name
    if method not in (*METHODS, "bf16"):
        return ours
    built = {} if built is None else built
    if method in built:  # -int8 and -compiled-int8 run one int8 model: one copy in memory
        return built[method]
    dtype = torch.bfloat16 if method == "bf16" else ours.model.embed_tokens.weight.dtype
    device = ours.model.embed_tokens.weight.device
    with torch.device("meta"):
        model = p3.Phi3ForCausalLM(dataclasses.replace(ours.config))
    for param_name, p in ours.named_parameters():
        set_parameter(model, param_name, p.to(dtype))  # the same tensor where the dtype is the same
    finish_meta_model(model, device)
    built[method] = (model if method == "bf16" else quantize_model(model, method)).eval()
    return built[method]


def transformers_compile(device):
    """transformers' own compiled generation, as its docs describe it.

    - With cache_implementation="static", generate compiles the decode step.
      Its mode is "reduce-overhead": CUDA graphs on a GPU.
    - It runs the prefill eagerly: a compiled prefill would allocate the static cache inside the graph.
    """
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = device.type != "cuda"  # transformers compiles off the GPU only when told
    return config


def copy_bandwidth(device) -> float | None:
    """Bytes per second a device-to-device copy moves (read + write), the practical ceiling."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    copies = 10  # back to back, so that one launch and one synchronization do not count as copying time
    seconds = min(timed(lambda: [y.copy_(x) for _ in range(copies)], device) for _ in range(3)) / copies
    return 2 * x.numel() / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small",
                        help="'small' (186 MB of fp32 weights), 'medium' (1.3 GB), 'micro' (8 MB), "
                             "'phi3-mini' (Phi-3-mini-4k's shape) "
                             "or a Phi-3 family model (e.g. microsoft/Phi-3.5-mini-instruct, or phi-4)")
    parser.add_argument("--checkpoint", help="a real checkpoint folder instead of random weights")
    parser.add_argument("--label",
                        help="the checkpoint's name in the output (default: --checkpoint or --config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--transformers", nargs="*", default=list(THEIRS), choices=THEIRS,
                        help="transformers' variants: eager and sdpa attention, "
                             "compiled (static cache + torch.compile)")
    parser.add_argument("--ours", nargs="*", default=list(OURS)[:5], choices=list(OURS),
                        help="phi3_scratch variants")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--profile", type=Path, help="also write a profile of 10 decode steps to this file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.new_tokens < 1 or args.prompt_len < 1:
        parser.error("--runs, --new-tokens and --prompt-len must be at least 1")

    device = torch.device(args.device)
    dtype = p3.loading.resolve_dtype(args.dtype, device, torch.bfloat16)
    ours, hf_models = build(args, device, dtype)
    built = {}
    impls = {name: variant(ours, name, built) for name in args.ours} | hf_models
    sizes = {name: model_bytes(ours if name.startswith("transformers-") else model)
             for name, model in impls.items()}
    bandwidth = copy_bandwidth(device)
    vocab = ours.config.vocab_size
    torch.manual_seed(1)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), device=device)
    n = args.new_tokens
    compile_config = transformers_compile(device) if "compiled" in args.transformers else None

    def decode(name, model, use_cache, n=n):
        if name.startswith("phi3_scratch"):
            compile = name.startswith("phi3_scratch-compiled")
            return lambda: p3.generate(model, prompt, n, use_cache=use_cache, eos_token_id=[],
                                       compile=compile)
        options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, use_cache=use_cache, pad_token_id=0)
        if name == "transformers-compiled":  # one cache length for every call, so no call recompiles for it
            return lambda: model.generate(prompt, cache_implementation="static",
                                          compile_config=compile_config,
                                          max_cache_len=prompt.shape[1] + args.new_tokens, **options)
        return lambda: model.generate(prompt, **options)

    def prefill(model, length):
        ids = torch.randint(0, vocab, (1, length), device=device)
        return lambda: model(ids)

    jobs = {("first_token", 1): lambda name, m: decode(name, m, True, 1),
            ("decode_cached", n): lambda name, m: decode(name, m, True),
            ("decode_uncached", n): lambda name, m: decode(name, m, False)}
    for length in args.prefill:
        if length <= ours.config.max_position_embeddings:
            jobs[(f"prefill_{length}", length)] = lambda name, m, length=length: prefill(m, length)
        else:
            print(f"bench: no prefill_{length}: "
                  f"the model has {ours.config.max_position_embeddings} positions",
                  file=sys.stderr, flush=True)

    def runs(job: str, name: str) -> bool:
        return JOBS.get(name) is None or job.startswith(JOBS[name])

    times = {(job, name): [] for job in jobs for name in impls if runs(job[0], name)}
    warmup, peaks, failed = {}, {}, {}
    def measure(run: int, job, make, name: str, model) -> None:
        """Time one call of one variant's job; run 0 is the warm-up (kernels, allocator, compilation)."""
        if name.startswith("transformers-"):
            kernel = name.removeprefix("transformers-")
            model.config._attn_implementation = "sdpa" if kernel == "compiled" else kernel
        else:
            model.set_attention("sdpa" if name.endswith("-sdpa") else "eager")
        fn = make(name, model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = timed(fn, device)
            if not run and name == "transformers-compiled":
                # A second warm-up: its sliding-window cache (Phi-3-mini's window is 2047) passes the
                # cache length to the compiled step as a Python int, and CUDA graphs record a graph
                # for each value the second time they see it; without this, timed run 1 would record
                # one per decode position.
                seconds += timed(fn, device)
        except Exception as e:  # one failing variant must not cost the others their (GPU) time
            failed[(job, name)] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
            return
        if run:
            times[(job, name)].append(seconds)
            peaks[(job, name)] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        else:
            warmup[(job, name)] = seconds

    stopped = False
    # `timeout` stops a long GPU run: report what it measured
    previous = signal.signal(signal.SIGTERM, time_is_up)
    try:
        with torch.no_grad():
            for run in range(args.runs + 1):  # alternating: every variant once per run
                for job, make in jobs.items():
                    for name, model in impls.items():
                        if runs(job[0], name) and (job, name) not in failed:
                            measure(run, job, make, name, model)
    except TimeIsUp:
        stopped = True
        print("bench: stopped by SIGTERM; reporting the runs finished", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    ours.set_attention("eager")
    for (job, name), error in failed.items():
        print(json.dumps({"measure": job[0], "impl": name, "error": error}), flush=True)

    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)")
    rows = []
    for job, tokens in jobs:
        eager = times.get(((job, tokens), "transformers-eager"))
        base = statistics.median(eager) if eager else None
        for name in impls:
            if not times.get(((job, tokens), name)) or ((job, tokens), name) in failed:
                continue
            median = statistics.median(times[((job, tokens), name)])
            row = {"measure": job, "impl": name, "config": args.label or args.checkpoint or args.config,
                   "device": card, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                   "tokens": tokens, "median_s": round(median, 5), "tokens_per_s": round(tokens / median, 2),
                   "ms_per_token": round(1000 * median / tokens, 3),
                   "runs_s": [round(t, 5) for t in times[((job, tokens), name)]],
                   "warmup_s": round(warmup[((job, tokens), name)], 3),
                   "ratio_to_transformers_eager": round(base / median, 3) if base else None,
                   "peak_memory_bytes": peaks.get(((job, tokens), name)), "weights_bytes": sizes[name][0]}
            if job == "decode_cached":
                first = times.get((("first_token", 1), name))
                row.update(decode_figures(median, statistics.median(first) if first else None, tokens,
                                          sizes[name][1], bandwidth))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.markdown and rows:  # none when every variant failed, or the time was up in the warm-up
        done = sorted({len(r["runs_s"]) for r in rows})
        runs_done = f"{done[0]}" if len(done) == 1 else f"{done[0]} to {done[-1]}"
        write_markdown(args.markdown, rows,
                       f"stopped by its timeout after {runs_done} of {args.runs} runs" if stopped else "")
    if args.profile and not stopped:
        write_profile(args.profile, ours, prompt, device)


class TimeIsUp(BaseException):
    """SIGTERM arrived while measuring (not an Exception: a failing variant's handler must not catch it)."""


def time_is_up(signum, frame):
    raise TimeIsUp


def decode_figures(median: float, first: float | None, tokens: int, step_bytes: int,
                   bandwidth: float | None) -> dict:
    """A cached decode's per-step time and bandwidth columns, from its median and the prefill's.

    One decode step takes out the prefill: (median - first) / (tokens - 1). On a busy machine that
    difference of two medians can come out at zero or below; the step columns are then None
    rather than a negative time. The bandwidth limit (only on a GPU) is what a device-to-device
    copy moves, reads and writes counted (the development workspace's PERFORMANCE.md: 7.64 GB /
    ~4.3 TB/s on an H200).
    End to end counts the prefill's time too; per step does not.
    """
    step = (median - first) / (tokens - 1) if first is not None and tokens > 1 else None
    step = step if step is not None and step > 0 else None
    row = {"decode_step_ms": None if step is None else round(1000 * step, 3)}
    if bandwidth:
        achieved = step_bytes * tokens / median
        row.update(achieved_gb_per_s=round(achieved / 1e9, 1), copy_gb_per_s=round(bandwidth / 1e9, 1),
                   bandwidth_fraction=round(achieved / bandwidth, 3),
                   step_gb_per_s=None if step is None else round(step_bytes / step / 1e9, 1),
                   step_bandwidth_fraction=None if step is None else round(step_bytes / step / bandwidth, 3))
    return row


if __name__ == "__main__":
    main()
