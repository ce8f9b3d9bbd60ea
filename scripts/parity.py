"""Full-size parity: this model's logits against transformers' eager Phi3ForCausalLM, same weights.

    python scripts/parity.py --config Phi-3-mini-4k-instruct --device cuda      # fp32 and bf16
    python scripts/parity.py --config small                                     # CPU-sized try-out

Random weights at the config's real shape (built once, shared by both models, see bench.py), a
random prompt of --seq-len tokens, TF32 off. One JSON line per dtype and path: the largest logit
difference, the largest logit, and how often both models pick the same top-1 token over the
positions. Path "eager" is one forward over the whole prompt; path "compiled" prefills the first
half eagerly and then feeds the second half one token at a time through the compiled decode step
(compile=True), comparing each step's logits with transformers' at that position. Path "int8" is
the same forward with every matrix quantized to int8 (quantize.py): its top-1 agreement with
transformers' unquantized model, teacher-forced over the whole prompt, is the quality figure
(the target: >= 95% at Phi-3-mini's shape); path "int4" the same with 4-bit groups of 128 (on
request). Path "bf16-weights" is a yardstick for it: the
unquantized model with the matrices int8 quantizes rounded to bf16 values, computed in the run's dtype,
so the error of rounding the weights alone (about 5x less than int8's); it rounds the weights in
place, so it runs after the other paths. Each row also says how often this model's top-1 token is
among transformers' top 5. fp32 is expected within 1e-3; bf16 rounds differently wherever two
kernels sum in a different order, so its figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import traceback

import torch

from phi3_scratch.benchmark import build, variant
from phi3_scratch.quantize import METHODS, quantized_names

import phi3_scratch as p3
from phi3_scratch import compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--paths", nargs="*", default=["eager", "compiled", "int8"],
                        choices=["eager", "compiled", *METHODS, "bf16-weights"])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    for name in args.dtypes:
        dtype = p3.loading.resolve_dtype(name, device, torch.bfloat16)
        args.transformers = ["eager"]
        ours, models = build(args, device, dtype)
        hf = models["transformers-eager"]
        hf.config._attn_implementation = "eager"  # transformers' default would be sdpa
        torch.manual_seed(2)
        ids = torch.randint(0, ours.config.vocab_size, (1, args.seq_len), device=device)
        with torch.inference_mode():
            b = hf(input_ids=ids).logits.float()[0]  # (T, V)
            for path in sorted(args.paths, key=lambda path: path == "bf16-weights"):  # the one that changes ours: last
                if path == "bf16-weights" and dtype == torch.bfloat16:
                    continue  # the weights are bf16 already
                try:
                    if path == "compiled":
                        a, first = compiled_logits(ours, ids), args.seq_len // 2
                    elif path == "bf16-weights":
                        a, first = with_bf16_weights(ours)(ids).float()[0], 0
                    else:
                        a, first = variant(ours, f"phi3_scratch-{path}")(ids).float()[0], 0  # eager, int8, int4
                except Exception as e:  # report it and go on: on a GPU the other rows are worth their time
                    traceback.print_exc()
                    print(json.dumps({"dtype": name, "path": path, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
                    continue
                theirs = b[first:]
                row = {"config": args.checkpoint or args.config, "dtype": name, "path": path, "device": str(device),
                       "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                       "seq_len": args.seq_len, "positions": len(a), "max_abs_diff": (a - theirs).abs().max().item(),
                       "max_abs_logit": theirs.abs().max().item(),
                       "top1_agreement": (a.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
                       "top1_in_their_top5": (theirs.topk(5, -1).indices == a.argmax(-1)[:, None]).any(-1)
                       .float().mean().item()}
                print(json.dumps(row), flush=True)
        del ours, models, hf, b
        if device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def with_bf16_weights(model):
    """`model` with each matrix int8 would quantize rounded to the nearest bf16 value, in place."""
    for name in quantized_names(model):
        weight = model.get_submodule(name).weight
        weight.copy_(weight.to(torch.bfloat16))
    return model


def compiled_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits at positions T/2..T-1 (T/2, V): eager prefill, then one compiled step per token."""
    T = ids.shape[1]
    cache = compiled.static_cache(model, 1, T)
    step = compiled.CompiledDecoder(model, cache, None)  # first, as in generate: it sets the cache's padding mask
    model(ids[:, : T // 2], cache)
    return torch.stack([step(ids[:, i : i + 1])[0] for i in range(T // 2, T)]).float()


if __name__ == "__main__":
    main()
