"""Encode speed of phi3_scratch's byte-level BPE (bpe.py) beside the `tokenizers` library's, on one file.

    python scripts/bench_bpe.py
    python scripts/bench_bpe.py --length 8000 --repeats 1

No Phi-4 tokenizer.json ships with the repository, so one is trained here with `tokenizers`, in
Phi-4-mini's layout (tiktoken's o200k split pattern, then ByteLevel). It learns from
scripts/tiny_corpus.txt plus short samples of each long kind, so that long runs have merges, as in
real vocabularies. Ordinary text is tiny_corpus.txt itself; the long inputs are one text of
--length characters each. The split cuts base64 into short words, so a second table times the
merge step alone on each long input taken as one word.

MB/s counts UTF-8 bytes of input. Every run starts from a fresh tokenizer, so no word cache helps.
The best of --repeats runs is shown. Every row checks that both give the same ids (or pieces).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import time
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from phi3_scratch.bpe import ByteLevelBPE, bytes_to_unicode

ROOT = Path(__file__).resolve().parents[1]
O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def long_inputs(n: int, rng: random.Random) -> dict[str, str]:
    """Texts of n characters that a tokenizer meets: a run of one character, random letters, base64."""
    return {
        "one repeated character ('a')": "a" * n,
        "random lowercase letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)),
        "base64 of random bytes": base64.b64encode(rng.randbytes(n * 3 // 4 + 3)).decode()[:n],
    }


def train(corpus: str, samples: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE in Phi-4-mini's layout, trained on the corpus and the samples."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(O200K), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([*corpus.split("\n\n"), *samples], trainer)
    return tok


def best_seconds(make, run, text: str, repeats: int) -> tuple[float, list]:
    """The fastest of `repeats` runs of run(make(), text), each on a new tokenizer, and what it gave."""
    best = float("inf")
    for _ in range(repeats):
        tokenizer = make()
        start = time.perf_counter()
        out = run(tokenizer, text)
        best = min(best, time.perf_counter() - start)
    return best, out


def table(rows: dict[str, str], ours, theirs, repeats: int) -> None:
    """Prints one markdown row per input: seconds and MB/s of ours(text) and theirs(text)."""
    print("| input | characters | phi3_scratch s | phi3_scratch MB/s | tokenizers s | tokenizers MB/s "
          "| same |")
    print("|---|---|---|---|---|---|---|")
    for name, text in rows.items():
        mb = len(text.encode()) / 1e6
        our_s, our_out = best_seconds(*ours, text, repeats)
        their_s, their_out = best_seconds(*theirs, text, repeats)
        same = "yes" if our_out == their_out else "NO"
        print(f"| {name} | {len(text):,} | {our_s:.3f} | {mb / our_s:.3g} "
              f"| {their_s:.4f} | {mb / their_s:.3g} | {same} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65_000, help="characters of each long input")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each encode; the fastest is shown")
    parser.add_argument("--vocab", type=int, default=4000, help="vocabulary size of the trained tokenizer")
    args = parser.parse_args(argv)

    rng = random.Random(0)
    corpus = (ROOT / "scripts" / "tiny_corpus.txt").read_text()
    samples = [text[:200] for text in long_inputs(200, rng).values()]
    theirs = train(corpus, samples, args.vocab)
    saved = theirs.to_str()

    def new_ours() -> ByteLevelBPE:
        return ByteLevelBPE.from_tokenizer_json(json.loads(saved), "trained here")

    def new_theirs() -> tokenizers.Tokenizer:
        return tokenizers.Tokenizer.from_str(saved)

    print(f"vocabulary {theirs.get_vocab_size()}, tokenizers {tokenizers.__version__}, "
          f"best of {args.repeats} runs")
    print("\nencode (split, bytes, merge):\n")
    longs = long_inputs(args.length, rng)
    table({"ordinary text (tiny_corpus.txt)": corpus, **longs},
          (new_ours, lambda bpe, text: bpe.encode(text)),
          (new_theirs, lambda tok, text: tok.encode(text, add_special_tokens=False).ids), args.repeats)
    print("\nthe merge step alone, each long input as one word (for tokenizers: its model's tokenize):\n")
    char_of_byte = bytes_to_unicode()
    table({name: "".join(char_of_byte[b] for b in text.encode()) for name, text in longs.items()},
          (new_ours, lambda bpe, word: bpe.merge(word)),
          (new_theirs, lambda tok, word: [t.value for t in tok.model.tokenize(word)]), args.repeats)


if __name__ == "__main__":
    main()
