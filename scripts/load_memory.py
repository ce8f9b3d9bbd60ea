"""Measure how much memory loading a checkpoint takes, against the size of its weights.

    python scripts/load_memory.py make DIR [--dtype bfloat16]   # a random ~270 MB Phi-3-shaped checkpoint
    python scripts/load_memory.py make DIR --mini-layers 8 --dtype bfloat16   # Phi-3-mini's width, 8 layers
    python scripts/load_memory.py measure DIR [--naive]         # one JSON line
    python scripts/load_memory.py measure DIR --device cuda     # onto the GPU, in the checkpoint's dtype

`measure` resets the process's peak-RSS counter (/proc/self/clear_refs), loads the checkpoint
(onto the CPU in float32 by default), runs one forward pass, and reports the peak resident memory
gained (anonymous memory plus mapped file pages), in bytes and as a multiple of the weights. On a
GPU it also reports the peak GPU memory allocated while loading, against the weights. With --naive
it loads the usual way instead (allocate the model, then copy a loaded state dict into it), which
holds two copies at its peak. Linux only: it reads /proc/self/status.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import phi3_scratch as p3
from phi3_scratch.benchmark import MINI  # Phi-3-mini-4k-instruct's shape; `make --mini-layers N` keeps N layers
from phi3_scratch.loading import weight_bytes
from phi3_scratch.quantize import METHODS

SHAPE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
             original_max_position_embeddings=256)


def make(folder: Path, dtype: torch.dtype, mini_layers: int | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shape = SHAPE if mini_layers is None else {**MINI, "num_hidden_layers": mini_layers}
    config = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "rope_theta": 10000.0,
              "rope_scaling": None, "sliding_window": None, "tie_word_embeddings": False, **shape}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        names = {n: p.shape for n, p in p3.Phi3ForCausalLM(p3.Phi3Config.from_dict(config)).named_parameters()}
    weight_map, shard, size = {}, {}, 0
    for i, (name, shape) in enumerate(names.items()):
        shard[name] = (torch.randn(shape) * 0.02).to(dtype)
        if i in (len(names) // 2 - 1, len(names) - 1):  # two shards
            file = f"model-{len(set(weight_map.values())) + 1:05d}-of-00002.safetensors"
            save_file(shard, folder / file)
            weight_map.update({n: file for n in shard})
            size += sum(t.numel() * t.element_size() for t in shard.values())
            shard = {}
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(folder: Path, naive: bool, device: str = "cpu", quantize: str | None = None) -> dict:
    # Building a model on the meta device first imports ~70 MB of torch's Python code. That is paid
    # once per process whatever the model's size, so it is done before the measurement starts.
    with torch.device("meta"):
        p3.Phi3ForCausalLM(p3.Phi3Config.from_dict({**json.loads((folder / "config.json").read_text()), "num_hidden_layers": 1}))
    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context's host memory is not the loader's
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    counted_from = "the start of loading"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = _status("VmRSS")
    except OSError:  # some containers forbid it: then the peak counts from the process's start
        before, counted_from = 0, "the process's start (clear_refs not allowed): torch and CUDA included"
    if naive:
        from safetensors.torch import load_file

        model = p3.Phi3ForCausalLM(p3.Phi3Config.from_pretrained(folder)).eval()  # allocates every weight
        for file in sorted(folder.glob("*.safetensors")):
            model.load_state_dict(load_file(file), strict=False)  # then copies the loaded ones in
    else:
        model = p3.Phi3ForCausalLM.from_pretrained(folder, device=device, dtype=None if cuda else torch.float32,
                                                   quantize=quantize)
    weights = weight_bytes(model)
    row = {"loader": "naive" if naive else "phi3_scratch", "quantize": quantize, "device": device,
           "weights_bytes": weights,
           "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}
    if cuda:
        torch.cuda.synchronize()
        gpu_peak = torch.cuda.max_memory_allocated() - gpu_before
        row.update(card=torch.cuda.get_device_name(), peak_gpu_growth_bytes=gpu_peak,
                   peak_gpu_over_weights=round(gpu_peak / weights, 3))
    # On the CPU, float32 weights from a float32 file stay mapped from the file and are only read
    # in (and counted) when used: the peak is taken after one forward pass. On a GPU every byte was
    # read already, and cuBLAS's own setup in the forward pass is not loading: the peak is taken first.
    peak = _status("VmHWM") - before
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 8), device=device))
        if cuda and quantize:  # int8's target (int4 reported): the whole of generation, KV cache included, from nothing
            p3.generate(model, torch.randint(0, model.config.vocab_size, (1, 32), device=device), 100, eos_token_id=[])
            row.update(peak_gpu_generating_bytes=torch.cuda.max_memory_allocated() - gpu_before)
    if not cuda:
        peak = _status("VmHWM") - before
    return {**row, "peak_rss_growth_bytes": peak, "peak_over_weights": round(peak / weights, 3),
            "peak_rss_counted_from": counted_from}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("folder", type=Path)
    mk.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    mk.add_argument("--mini-layers", type=int, help="Phi-3-mini's widths with this many layers")
    ms = sub.add_parser("measure")
    ms.add_argument("folder", type=Path)
    ms.add_argument("--naive", action="store_true")
    ms.add_argument("--device", default="cpu")
    ms.add_argument("--quantize", choices=METHODS, help="quantize while loading (quantize.py)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.folder, getattr(torch, args.dtype), args.mini_layers)
    else:
        print(json.dumps(measure(args.folder, args.naive, args.device, args.quantize)))


if __name__ == "__main__":
    main()
