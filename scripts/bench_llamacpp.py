"""CPU decode and prefill beside llama.cpp, on the same random weights, in GGUF made by llama.cpp's converter.

    python scripts/bench_llamacpp.py                    # small, medium and mid; 2 threads
    python scripts/bench_llamacpp.py --shapes mid --runs 5

What it does, for each shape:
1. Random weights (std 0.02) of that Phi-3 shape, saved by transformers, with Phi-3's tokenizer files
   beside them (the converter reads tokenizer.model; vocabulary 32064 is Phi-3's). They come from
   ../shared/fixtures/phi3-tokenizer, or --tokenizer DIR: without them the script says so and stops.
2. llama.cpp's own converter (vendor/llama.cpp/convert_hf_to_gguf.py in llama-cpp-python's source,
   with its gguf-py) writes F32 and Q8_0 GGUF files.
3. Alternating runs, one process, --threads threads each: decode (--new tokens after a 16-token
   prompt) and a --prefill-token forward pass, for phi3_scratch fp32, int8 compiled and fp32
   compiled, and llama.cpp F32 and Q8_0. Medians of --runs runs after one warm-up.
4. The greedy tokens of phi3_scratch fp32 against llama.cpp F32's: an independent implementation.
5. This machine's copy and read bandwidth (a 1 GB tensor copied, and summed), beside what each
   decode path reads a second (the weights of a step, times the steps, over the run's time).

llama-cpp-python is built from source when it is missing, with AMX off (a native build segfaults
on its first Q8_0 evaluation on a CPU with AMX) and each other instruction set on where the CPU
has it. Not a test and not a CI step: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import phi3_scratch as p3  # noqa: E402  (the repository's package, not an installed one)
from phi3_scratch.benchmark import MEDIUM, SMALL  # noqa: E402

MID = {**SMALL, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
       "num_attention_heads": 16, "num_key_value_heads": 16}  # the shape of the first measurement
SHAPES = {"small": SMALL, "medium": MEDIUM, "mid": MID}

def cmake_args() -> str:
    """llama.cpp's build flags for this CPU: each instruction set on where /proc/cpuinfo lists it, AMX off.

    A native build (GGML_NATIVE) segfaults on its first Q8_0 evaluation on a CPU with AMX; one with
    AVX-512 turned on dies of an illegal instruction on a CPU without it (an AMD EPYC with AVX2 only).
    """
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    wanted = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f",
              "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AVX_VNNI": "avx_vnni"}
    on = " ".join(f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}" for name, flag in wanted.items())
    return f"-DGGML_NATIVE=OFF {on} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

TOKENIZER = ROOT.parent / "shared" / "fixtures" / "phi3-tokenizer"
CACHE = Path(os.environ.get("PHI3_BENCH_CACHE", Path(tempfile.gettempdir()) / "phi3_scratch-llamacpp"))
PROMPT_LEN = 16


def llama_cpp():
    """The llama_cpp module, built from source first where it is missing."""
    try:
        import llama_cpp
        return llama_cpp
    except ImportError:
        pass
    args = cmake_args()
    print(f"building llama-cpp-python from source (minutes), CMAKE_ARGS={args}", flush=True)
    env = {**os.environ, "CMAKE_ARGS": args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python",
                    "llama-cpp-python"], check=True, env=env)
    import llama_cpp
    return llama_cpp


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from llama-cpp-python's source distribution."""
    script = CACHE / "source" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = CACHE / "download"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "llama-cpp-python", "-d", str(download)], check=True, capture_output=True)
    (archive,) = download.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(CACHE, filter="data")
    shutil.rmtree(CACHE / "source", ignore_errors=True)
    (CACHE / top).rename(CACHE / "source")
    return script


def checkpoint(name: str, shape: dict, tokenizer: Path) -> Path:
    """The random-weight checkpoint of a shape, with Phi-3's tokenizer files, saved once."""
    import transformers

    folder = CACHE / name
    if (folder / "model.safetensors").is_file():
        return folder
    cfg = {k: v for k, v in shape.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    hf.save_pretrained(folder)
    for file in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / file, folder / file)
    return folder


def gguf(folder: Path, kind: str) -> Path:
    """llama.cpp's converter on the checkpoint: f32 or q8_0."""
    out = folder / f"model-{kind}.gguf"
    if not out.is_file():
        script = converter()
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        subprocess.run([sys.executable, str(script), str(folder), "--outtype", kind, "--outfile", str(out)],
                       check=True, env=env, capture_output=True)
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    """Bytes a second a 1 GB tensor copy moves on this machine (read and write counted)."""
    # 1 GiB, written first: pages never written read as zeros without touching memory
    a = torch.ones(2**28, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(timed(lambda: b.copy_(a)) for _ in range(3))
    return 2 * a.numel() * a.element_size() / best


def read_bandwidth() -> float:
    """Bytes a second torch's sum reads from a 1 GB tensor, on the threads set: a decode step's ceiling."""
    a = torch.ones(2**28, dtype=torch.float32)
    best = min(timed(a.sum) for _ in range(3))
    return a.numel() * a.element_size() / best


def step_bytes(model) -> int:
    """Bytes one decode step reads: every parameter but the embedding (one row of it is read)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new", type=int, default=64, help="new tokens a decode run makes (default 64)")
    parser.add_argument("--prefill", type=int, default=256, help="tokens of the prefill run (default 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER,
                        help="a folder with Phi-3's tokenizer.model "
                             "(default ../shared/fixtures/phi3-tokenizer)")
    args = parser.parse_args(argv)
    if not (args.tokenizer / "tokenizer.model").is_file():
        print(f"error: {args.tokenizer / 'tokenizer.model'} not found: llama.cpp's converter needs Phi-3's "
              "tokenizer beside the weights (vocabulary 32064); give --tokenizer DIR", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    lib = llama_cpp()
    copy, read = copy_bandwidth(), read_bandwidth()
    print(f"CPU threads {args.threads}, torch {torch.__version__}, llama-cpp-python {lib.__version__}; "
          f"copy bandwidth {copy / 1e9:.1f} GB/s (read and write counted), read {read / 1e9:.1f} GB/s",
          flush=True)
    for name in args.shapes:
        folder = checkpoint(name, SHAPES[name], args.tokenizer)
        rows = measure(lib, folder, args)
        fp32 = step_bytes(p3.Phi3ForCausalLM.from_pretrained(folder))
        int8 = step_bytes(p3.Phi3ForCausalLM.from_pretrained(folder, quantize="int8"))
        # llama.cpp's Q8_0 stores 32 weights in 34 bytes (an fp16 scale a block); its norms stay F32
        read_per_step = {"fp32": fp32, "F32": fp32, "int8": int8, "Q8_0": fp32 * 34 / 128}
        for row in rows:
            row.update(shape=name, step_gb=round(fp32 / 1e9, 3))
            kind = next((k for k in read_per_step if k in row["path"]), None)
            if row["job"] == "decode" and kind:  # the weights' bytes of every step over the run's time
                row["read_gb_s"] = round(read_per_step[kind] * args.new / row["median_s"] / 1e9, 1)
            print(json.dumps(row), flush=True)
    return 0


def measure(lib, folder: Path, args) -> list[dict]:
    """Decode and prefill times of every path on one checkpoint, alternating, and the token check."""
    torch.manual_seed(1)
    prompt = torch.randint(100, 30000, (1, PROMPT_LEN))
    long = torch.randint(100, 30000, (1, args.prefill))
    fp32 = p3.Phi3ForCausalLM.from_pretrained(folder)
    int8 = p3.Phi3ForCausalLM.from_pretrained(folder, quantize="int8")
    llamas = {kind: lib.Llama(model_path=str(gguf(folder, kind)), n_ctx=args.prefill + args.new + 8,
                              n_threads=args.threads, n_batch=args.prefill, verbose=False)
              for kind in ("f32", "q8_0")}

    def last_logits(llm):  # the last position's logits (llm.scores holds them only with logits_all=True)
        row = lib.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))

    def llama_decode(llm, new=args.new):
        llm.reset()
        llm.eval(prompt[0].tolist())
        out = []
        for _ in range(new):
            token = int(last_logits(llm).argmax())
            out.append(token)
            llm.eval([token])
        return out

    def llama_prefill(llm):
        llm.reset()
        llm.eval(long[0].tolist())

    with torch.inference_mode():
        paths = {
            "phi3_scratch fp32": (lambda: p3.generate(fp32, prompt, args.new, eos_token_id=[]),
                                  lambda: fp32(long, logits_to_keep=1)),
            "phi3_scratch fp32 compiled": (lambda: p3.generate(fp32, prompt, args.new, eos_token_id=[],
                                                               compile=True), None),
            "phi3_scratch int8 compiled": (lambda: p3.generate(int8, prompt, args.new, eos_token_id=[],
                                                               compile=True),
                                           lambda: int8(long, logits_to_keep=1)),
            "llama.cpp F32": (lambda: llama_decode(llamas["f32"]), lambda: llama_prefill(llamas["f32"])),
            "llama.cpp Q8_0": (lambda: llama_decode(llamas["q8_0"]), lambda: llama_prefill(llamas["q8_0"])),
        }
        times = {(path, job): [] for path in paths for job in ("decode", "prefill")}
        for run in range(args.runs + 1):  # run 0 warms up (and compiles)
            for path, (decode, prefill) in paths.items():
                for job, fn in (("decode", decode), ("prefill", prefill)):
                    if fn is not None:
                        seconds = timed(fn)
                        if run:
                            times[(path, job)].append(seconds)
        ours_tokens = p3.generate(fp32, prompt, args.new, eos_token_id=[])[0, PROMPT_LEN:].tolist()
    theirs_tokens = llama_decode(llamas["f32"])
    same = sum(a == b for a, b in zip(ours_tokens, theirs_tokens))
    rows = []
    for (path, job), runs in times.items():
        if runs:
            row = {"path": path, "job": job, "median_s": round(statistics.median(runs), 4),
                   "runs_s": [round(t, 4) for t in runs]}
            if path.startswith("phi3_scratch"):  # x llama.cpp: its F32 for fp32, its Q8_0 for int8
                reference = times[("llama.cpp Q8_0" if "int8" in path else "llama.cpp F32", job)]
                row["x_llamacpp"] = round(statistics.median(reference) / statistics.median(runs), 2)
            rows.append(row)
    rows.append({"path": "greedy tokens, phi3_scratch fp32 vs llama.cpp F32", "job": "check",
                 "equal": f"{same}/{len(ours_tokens)}", "first_difference": next(
                     (i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), None)})
    return rows


if __name__ == "__main__":
    sys.exit(main())
