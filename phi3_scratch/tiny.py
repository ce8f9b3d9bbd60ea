"""`--model tiny`: a small Phi-3 that this project trains for itself, so everything runs offline.

The real Phi-3-mini is 7.6 GB and needs a download. This module makes a stand-in once and keeps it
in the user's cache folder (~/.cache/phi3-scratch, or $PHI3_SCRATCH_CACHE):

1. Text: the docstrings and comments of this package, plus question/answer pairs in Phi-3's chat
   format built from them ("What does generate do?" -> its docstring's first sentence).
2. Tokenizer: a sentencepiece BPE model trained on that text with Llama's settings (byte
   fallback, a leading "▁", digits split), then Phi-3's added tokens (<|user|>, <|end|>, ...)
   appended after its pieces, exactly as Phi-3 appends them after Llama's 32000.
3. Model: a 4-layer Phi-3 (GQA, sliding window) trained for about a minute on the CPU.
4. Saved in the official on-disk format (config.json with rope_theta/rope_scaling,
   generation_config.json, model.safetensors, tokenizer.model, tokenizer_config.json) and loaded
   by the same code as real weights.

What it writes is not Phi-3's text: it has only ever read this package's documentation, and it
repeats fragments of it. It is here to make every command runnable, not to be useful.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Phi3Config
from .model import Phi3ForCausalLM

ADDED_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
SP_VOCAB = 512
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, sliding_window=256)
TRAIN = dict(steps=700, batch=16, seq_len=128, lr=3e-3, seed=0)
VERSION = "1"  # bump when the recipe changes; the corpus and settings are hashed too


def cache_root() -> Path:
    if os.environ.get("PHI3_SCRATCH_CACHE"):
        return Path(os.environ["PHI3_SCRATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi3-scratch"


def corpus() -> tuple[list[str], list[tuple[str, str]]]:
    """This package's docstrings and comments as paragraphs, and (question, answer) pairs."""
    paragraphs, pairs = [], []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            paragraphs += [p.strip() for p in doc.split("\n\n") if p.strip()]
            if not isinstance(node, ast.Module) and not node.name.startswith("_"):
                pairs.append((f"What does {node.name} do?", doc.split("\n\n")[0].strip()))
        comments = [line.split("# ", 1)[1] for line in source.splitlines() if line.lstrip().startswith("# ")]
        paragraphs += [c for c in comments if len(c) > 20]
    return paragraphs, pairs


def tiny_folder(steps: int | None = None, progress: bool = True) -> Path:
    """The tiny checkpoint's folder, made (about a minute) on first use and cached."""
    paragraphs, pairs = corpus()
    train = {**TRAIN, **({"steps": steps} if steps else {})}
    recipe = json.dumps([VERSION, paragraphs, pairs, SHAPE, train, SP_VOCAB])
    folder = cache_root() / f"tiny-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    if (folder / "model.safetensors").is_file():
        return folder
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"making the tiny checkpoint once, in {folder} ...")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent))  # renamed into place only when complete
    try:
        build(work, paragraphs, pairs, train, progress)
        if not folder.exists():
            work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def train_sentencepiece(paragraphs: list[str]) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs), model_writer=model, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384, num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def build(folder: Path, paragraphs: list[str], pairs: list[tuple[str, str]], train: dict, progress: bool) -> dict:
    """Train the tokenizer and the model and write the checkpoint into `folder`; returns the losses."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    sp_bytes = train_sentencepiece(paragraphs)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    added = {name: sp.get_piece_size() + i for i, name in enumerate(ADDED_TOKENS)}
    vocab_size = math.ceil((sp.get_piece_size() + len(ADDED_TOKENS)) / 64) * 64  # padded like Phi-3's 32064

    # The training text as one stream of ids: paragraphs, then chats, each closed by <|endoftext|>.
    eot, user, assistant, end = (added[t] for t in ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"))
    stream = []
    for p in paragraphs:
        stream += sp.encode(p) + [eot]
    for question, answer in pairs:
        stream += [user, *sp.encode(question), end, assistant, *sp.encode(answer), end, eot]
    data = torch.tensor(stream)

    official = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": vocab_size, **SHAPE,
        "original_max_position_embeddings": SHAPE["max_position_embeddings"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": eot, "pad_token_id": eot, "torch_dtype": "float32",
    }
    config = Phi3Config.from_dict(official)
    torch.manual_seed(train["seed"])
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    losses = fit(model, data, train, progress)

    (folder / "config.json").write_text(json.dumps(official, indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": [eot, assistant, end], "pad_token_id": eot}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "tokenizer.model").write_bytes(sp_bytes)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(added), indent=2))
    (folder / "training.json").write_text(json.dumps({"tokens": len(stream), **train, **losses}, indent=2))
    return losses


def tokenizer_config(added: dict[str, int]) -> dict:
    from .tokenizer import CHAT_TEMPLATE_PHI3

    entry = lambda content, rstrip, special: {"content": content, "lstrip": False, "normalized": False,
                                              "rstrip": rstrip, "single_word": False, "special": special}
    decoder = {"0": entry("<unk>", False, True), "1": entry("<s>", False, True), "2": entry("</s>", True, False)}
    decoder.update({str(i): entry(name, name != "<|endoftext|>", True) for name, i in added.items()})
    return {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
            "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
            "chat_template": CHAT_TEMPLATE_PHI3, "clean_up_tokenization_spaces": False, "legacy": False}


def fit(model: Phi3ForCausalLM, data: torch.Tensor, train: dict, progress: bool) -> dict:
    """Next-token prediction on random windows of the stream, AdamW with a cosine schedule."""
    generator = torch.Generator().manual_seed(train["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=0.0)
    steps, n = train["steps"], train["seq_len"] + 1
    first = last = float("nan")
    start = time.perf_counter()
    for step in range(steps):
        lr = train["lr"] * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - n, (train["batch"],), generator=generator)
        batch = torch.stack([data[s : s + n] for s in starts.tolist()])  # (batch, seq_len + 1)
        logits = model(batch[:, :-1])  # (batch, seq_len, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
        if progress and (step % 10 == 0 or step == steps - 1):
            done = (step + 1) / steps
            bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
            print(f"\rtraining tiny Phi-3 [{bar}] step {step + 1}/{steps} loss {last:.2f} "
                  f"{time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    model.eval()
    return {"first_loss": first, "final_loss": last}
