"""The benchmark's reports beyond its JSON lines, and the timer it uses.

- timed: one call's wall time, the device caught up before and after.
- write_profile: torch.profiler's table of 10 decode steps, eager then compiled, then step_anatomy.
- step_anatomy: a compiled step alone beside a step of generate's loop; on a GPU, its kernels.
- kernel_timeline: the kernels' busy time and the longest gaps between them.
- write_markdown: the table of --markdown (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch

import phi3_scratch as p3
from phi3_scratch import compiled, generation


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def write_profile(path: Path, model, prompt: torch.Tensor, device: torch.device) -> None:
    """The operations that take the time of 10 cached decode steps, eager then compiled; then where a
    compiled step's time goes (step_anatomy)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    sections = []
    for compile in (False, True):
        # prefill + 10 decode steps
        run = lambda: p3.generate(model, prompt, 11, eos_token_id=[], compile=compile)
        run()  # warm
        wall = timed(run, device)  # without the profiler, which slows the host down
        with profile(activities=activities) as prof:
            run()
            sync(device)
        events = prof.key_averages()
        # Kernels are the events on the device; ranges such as a compiled region (user annotations on
        # the device) repeat their time, as torch's own table knows.
        busy = sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
        summary = f"wall time {1000 * wall:.1f} ms" + (f", GPU kernels {1000 * busy:.1f} ms" if busy else "")
        table = events.table(sort_by=sort, row_limit=15, max_name_column_width=60)
        sections.append(f"## {'compiled' if compile else 'eager'}: prefill of {prompt.shape[1]} "
                        f"+ 10 decode steps, {summary}\n\n{table}")
    sections.append(step_anatomy(model, prompt, device))
    path.write_text("\n\n".join(sections))


@torch.inference_mode()  # the model's static cache was made in inference mode, by generate
def step_anatomy(model, prompt: torch.Tensor, device: torch.device, steps: int = 20) -> str:
    """Where a compiled decode step's time goes: the generate loop around it, the step alone, its kernels.

    - a step of generate: (generate of steps + 1 tokens - generate of 1 token) / steps
    - the step alone: the compiled step replayed `steps` times back to back on one token, without
      the loop's argmax, stop check and sequence bookkeeping
    (each the fastest of 3 tries)
    - on a GPU, from the profiler's kernel timestamps over the replays: the kernels' own time, the
      idle time between them, and the longest idle gaps with the kernels on either side.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fastest = lambda fn: min(timed(fn, device) for _ in range(3))
    run = lambda n: (lambda: p3.generate(model, prompt, n, eos_token_id=[], compile=True))
    loop = (fastest(run(steps + 1)) - fastest(run(1))) / steps
    # slots: the prompt, 1 warm-up step, 3 timed tries and 1 profiled run of `steps` steps each
    cache = compiled.static_cache(model, prompt.shape[0], prompt.shape[1] + 4 * steps + 1)
    decoder = compiled.CompiledDecoder(model, cache, None)  # first, as in generate: it sets the padding mask
    generation.last_logits(model, prompt, cache, None)  # prefill
    token = prompt[:, -1:]
    decoder(token)  # warm
    alone = fastest(lambda: [decoder(token) for _ in range(steps)]) / steps
    lines = [f"## compiled decode step, {steps} steps: where the time goes", "",
             f"- a step of generate (the loop around the step included): {1000 * loop:.3f} ms",
             f"- the compiled step alone, replayed back to back: {1000 * alone:.3f} ms"]
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder(token)
            sync(device)
        lines += kernel_timeline([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                                  if e.device_type == DeviceType.CUDA and not e.is_user_annotation], steps)
    return "\n".join(lines)


def kernel_timeline(kernels: list[tuple[float, float, str]], steps: int) -> list[str]:
    """Lines on the kernels of `steps` decode steps, each (start us, end us, name): their time, the
    time the device ran none of them, and the longest such gaps with the kernels on either side."""
    kernels = sorted(kernels)
    if not kernels:
        return ["- kernels: the profiler recorded none"]
    gaps, busy, end, last = [], 0.0, kernels[0][0], kernels[0][2]
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, last, name))
        busy += max(0.0, stop - max(start, end))  # overlapping kernels count once
        if stop > end:
            end, last = stop, name
    idle = sum(gap for gap, _, _ in gaps)
    lines = [f"- kernels: {len(kernels) / steps:.0f} a step, running {busy / steps / 1000:.3f} ms a step, "
             f"none running {idle / steps / 1000:.3f} ms a step "
             "(profiled; from the first kernel to the last)",
             "", "The longest gaps with no kernel running (us; the kernel before -> the kernel after):", ""]
    return lines + [f"    {gap:8.1f}  {before[:70]}  ->  {after[:70]}"
                    for gap, before, after in sorted(gaps)[::-1][:15]]


def write_markdown(path: Path, rows: list[dict], stopped: str = "") -> None:
    first = rows[0]
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench.py --markdown`; do not edit by hand. Medians of the runs shown;",
        "the ratio is to transformers' eager attention in the same process, on the same weights.",
        "tokens/s of decode_cached counts the prefill (first_token) too; a decode step does not:",
        "(decode_cached - first_token) / (new tokens - 1). Bandwidth (GPU only): the bytes a decode",
        "step reads over its time, and its fraction of what a device-to-device copy moves. Peak memory",
        "(GPU only): the process's peak during the call, every model built for the run included.",
        "",
        f"## {first['config']}, {first['dtype']}, {first['device']}, torch {first['torch']}, "
        f"{datetime.date.today().isoformat()}" + (f" ({stopped})" if stopped else ""),
        "",
        "| measure | implementation | tokens/s | ms/token | x transformers eager | decode step ms "
        "| peak memory | GB/s per step (fraction) | GB/s end to end (fraction) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "-"
        step = f"{r['decode_step_ms']:.2f}" if r.get("decode_step_ms") is not None else "-"
        per_step = (f"{r['step_gb_per_s']} ({r['step_bandwidth_fraction']:.0%})"
                    if r.get("step_gb_per_s") is not None else "-")
        end_to_end = (f"{r['achieved_gb_per_s']} ({r['bandwidth_fraction']:.0%})"
                      if "achieved_gb_per_s" in r else "-")
        ratio = f"{r['ratio_to_transformers_eager']:.2f}" if r["ratio_to_transformers_eager"] else "-"
        lines.append(f"| {r['measure']} | {r['impl']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | "
                     f"{ratio} | {step} | {peak} | {per_step} | {end_to_end} |")
    # Keep the sections for other configs, dtypes or cards already in the file; replace this one.
    key = lambda heading: heading.split(", torch")[0]  # "config, dtype, card"
    old = path.read_text().split("\n## ")[1:] if path.is_file() else []
    heading = next(line for line in lines if line.startswith("## "))[3:]
    kept = ["\n## " + s for s in old if key(s.splitlines()[0]) != key(heading)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + "".join(kept))
