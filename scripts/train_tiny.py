"""Rebuild the built-in tiny model (`--model tiny`, phi3_scratch/data/tiny) from scripts/tiny_corpus.txt.

    python scripts/train_tiny.py                          # rewrites phi3_scratch/data/tiny (4-8 min on 2 cores)
    python scripts/train_tiny.py --out /tmp/tiny --steps 20

What it does, and why:
1. Reads the corpus, a committed text file (not the package's live docstrings, so that editing
   a comment changes nothing the tiny model says): prose paragraphs and question/answer pairs
   about how Phi-3 and this project work, in English and some Rioplatense Spanish, plus a
   snapshot of the package's docstrings taken once.
2. Trains a sentencepiece BPE tokenizer on it with Llama's settings (byte fallback, a leading
   "▁", digits split), then appends Phi-3's added tokens (<|endoftext|>, <|user|>, <|end|>, ...)
   after its pieces, as Phi-3 appends them after Llama's 32000.
3. Trains a 4-layer Phi-3 (GQA, sliding window) on one stream of ids: each paragraph, then each
   pair as a chat in Phi-3's format (repeated, so that the answers are learned word for word),
   each closed by <|endoftext|>.
4. Writes the checkpoint in the official on-disk format (config.json with rope_theta and
   rope_scaling, generation_config.json, model.safetensors, tokenizer.model,
   tokenizer_config.json, and tokenizer.json: the same tokenizer in the layout of Phi-3's published
   tokenizer.json, which transformers' AutoTokenizer reads) and training.json (the recipe, the
   losses), then prints the sha256 of every file it wrote.

`--tokenizer-json` only writes tokenizer.json again from the folder's tokenizer.model and
tokenizer_config.json (needs the `tokenizers` package, in the test extra), without training.

Training runs on the CPU in float32 with fixed seeds; its bytes can still differ between
machines (thread counts and CPU kernels round differently), which is why the model is committed
rather than rebuilt on install.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi3_scratch.config import Phi3Config  # noqa: E402
from phi3_scratch.model import Phi3ForCausalLM  # noqa: E402
from phi3_scratch.tokenizer import CHAT_TEMPLATE_PHI3  # noqa: E402

CORPUS = ROOT / "scripts" / "tiny_corpus.txt"
OUT = ROOT / "phi3_scratch" / "data" / "tiny"
ADDED_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
SP_VOCAB = 1000
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, sliding_window=256)
TRAIN = dict(steps=1500, batch=16, seq_len=128, lr=3e-3, seed=0, chat_repeats=3)


def read_corpus(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(paragraphs, (question, answer) pairs) of the corpus file.

    Blocks are separated by blank lines; lines starting with '#' are comments; a block whose first
    line starts with "Q: " and whose second starts with "A: " is a pair, any other is a paragraph.
    """
    paragraphs, pairs = [], []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    for block in "\n".join(lines).split("\n\n"):
        block = block.strip("\n")
        if not block.strip():
            continue
        first, _, rest = block.partition("\n")
        if first.startswith("Q: ") and rest.startswith("A: "):
            pairs.append((first[3:].strip(), rest[3:].strip()))
        else:
            paragraphs.append(block)
    return paragraphs, pairs


def train_sentencepiece(texts: list[str]) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def tokenizer_config(added: dict[str, int]) -> dict:
    """tokenizer_config.json as Phi-3-mini ships it: added tokens with rstrip, no BOS, its chat template."""
    entry = lambda content, rstrip, special: {"content": content, "lstrip": False, "normalized": False,
                                              "rstrip": rstrip, "single_word": False, "special": special}
    decoder = {"0": entry("<unk>", False, True), "1": entry("<s>", False, True), "2": entry("</s>", True, False)}
    decoder.update({str(i): entry(name, name != "<|endoftext|>", True) for name, i in added.items()})
    return {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
            "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
            "chat_template": CHAT_TEMPLATE_PHI3, "clean_up_tokenization_spaces": False, "legacy": False}


def tokenizer_json(folder: Path):
    """A tokenizers.Tokenizer in the layout of Phi-3's published tokenizer.json, from folder's
    tokenizer.model and the added tokens of its tokenizer_config.json.

    The layout: a BPE model over the sentencepiece pieces with byte fallback; merges ranked by the
    id of the piece they make (sentencepiece's scores rank pieces by id); the normalizer prepends
    "▁" and turns spaces into it; the decoder undoes that, joins byte pieces and strips the
    leading space. On Phi-3's real tokenizer.model this gives the published file's ids (a test
    checks it where the real files are).
    """
    import sentencepiece as spm
    import tokenizers
    from tokenizers import decoders, normalizers

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []  # every way to make a piece from two shorter ones, ranked by the piece's id
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(merges)]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                                                     byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for _, entry in sorted(config["added_tokens_decoder"].items(), key=lambda item: int(item[0])):
        token = tokenizers.AddedToken(entry["content"], lstrip=entry.get("lstrip", False),
                                      rstrip=entry.get("rstrip", False), normalized=False,
                                      special=entry.get("special", True))
        (tok.add_special_tokens if entry.get("special", True) else tok.add_tokens)([token])
    return tok


def write_tokenizer_json(folder: Path) -> None:
    tokenizer_json(folder).save(str(folder / "tokenizer.json"))


def print_hashes(paths: list[Path]) -> None:
    for path in sorted(paths):
        data = path.read_bytes()
        print(f"{hashlib.sha256(data).hexdigest()}  {len(data):>9,} B  {path}")


def fit(model: Phi3ForCausalLM, data: torch.Tensor, train: dict) -> dict:
    """Next-token prediction on random windows of the stream, AdamW with warm-up and a cosine schedule."""
    generator = torch.Generator().manual_seed(train["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=0.0)
    steps, n = train["steps"], train["seq_len"] + 1
    losses = []
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
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            done = (step + 1) / steps
            bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
            print(f"\rtraining tiny Phi-3 [{bar}] step {step + 1}/{steps} loss {losses[-1]:.2f} "
                  f"{time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    model.eval()
    return {"first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
            "seconds": round(time.perf_counter() - start, 1)}


def build(out: Path, corpus: Path, train: dict) -> None:
    import sentencepiece as spm
    from safetensors.torch import save_file

    paragraphs, pairs = read_corpus(corpus)
    sp_bytes = train_sentencepiece(paragraphs + [f"{q}\n{a}" for q, a in pairs])
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    added = {name: sp.get_piece_size() + i for i, name in enumerate(ADDED_TOKENS)}
    vocab_size = math.ceil((sp.get_piece_size() + len(ADDED_TOKENS)) / 64) * 64  # padded like Phi-3's 32064

    eot, user, assistant, end = (added[t] for t in ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"))
    stream = []
    for p in paragraphs:
        stream += sp.encode(p) + [eot]
    for _ in range(train["chat_repeats"]):
        for question, answer in pairs:  # what the chat template and the tokenizer make of one exchange
            stream += [user, *sp.encode(question), end, assistant, *sp.encode(answer), end, eot]
    data = torch.tensor(stream)

    official = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": vocab_size, **SHAPE,
        "original_max_position_embeddings": SHAPE["max_position_embeddings"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": eot, "pad_token_id": eot, "torch_dtype": "float32",
    }
    torch.manual_seed(train["seed"])
    model = Phi3ForCausalLM(Phi3Config.from_dict(official))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    print(f"corpus: {len(paragraphs)} paragraphs, {len(pairs)} question/answer pairs, {len(stream):,} tokens; "
          f"model: {sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)
    result = fit(model, data, train)

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": json.dumps(official, indent=2) + "\n",
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": [eot, assistant, end],
                                              "pad_token_id": eot}, indent=2) + "\n",
        "tokenizer.model": sp_bytes,
        "tokenizer_config.json": json.dumps(tokenizer_config(added), indent=2) + "\n",
        "training.json": json.dumps({
            "corpus": corpus.name, "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
            "paragraphs": len(paragraphs), "pairs": len(pairs), "tokens": len(stream), "sentencepiece_vocab": SP_VOCAB,
            **train, **result, "torch": torch.__version__}, indent=2) + "\n",
    }
    for name, content in files.items():
        (out / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    write_tokenizer_json(out)
    print_hashes([out / name for name in [*files, "model.safetensors", "tokenizer.json"]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write the checkpoint (default {OUT})")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--steps", type=int, default=TRAIN["steps"])
    parser.add_argument("--tokenizer-json", action="store_true",
                        help="only write --out's tokenizer.json again, from its tokenizer.model (no training)")
    args = parser.parse_args(argv)
    if args.tokenizer_json:
        write_tokenizer_json(args.out)
        print_hashes([args.out / "tokenizer.json"])
    else:
        build(args.out, args.corpus, {**TRAIN, "steps": args.steps})


if __name__ == "__main__":
    main()
