"""Full-size parity: this model's logits against transformers' eager Phi3ForCausalLM, same weights.

    python scripts/parity.py --config Phi-3-mini-4k-instruct --device cuda      # fp32 and bf16
    python scripts/parity.py --config small                                     # CPU-sized try-out

Random weights at the config's real shape (built once, shared by both models, see bench.py), a
random prompt of --seq-len tokens, TF32 off. One JSON line per dtype: the largest logit
difference, the largest logit, and how often both models pick the same top-1 token over the
positions. fp32 is expected within 1e-3; bf16 rounds differently wherever two kernels sum in a
different order, so its figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json

import torch

from phi3_scratch.benchmark import build

import phi3_scratch as p3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    for name in args.dtypes:
        dtype = p3.loading.resolve_dtype(name, device, torch.bfloat16)
        args.transformers = ["eager"]
        ours, models = build(args, device, dtype)
        hf = models["transformers-eager"]
        torch.manual_seed(2)
        ids = torch.randint(0, ours.config.vocab_size, (1, args.seq_len), device=device)
        with torch.no_grad():
            a, b = ours(ids).float(), hf(input_ids=ids).logits.float()
        row = {"config": args.checkpoint or args.config, "dtype": name, "device": str(device),
               "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "seq_len": args.seq_len, "max_abs_diff": (a - b).abs().max().item(),
               "max_abs_logit": b.abs().max().item(),
               "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
        print(json.dumps(row), flush=True)
        del ours, models, hf, a, b
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
