"""Byte-level BPE: the tokenizer Phi-4-mini and phi-4 ship in tokenizer.json (no sentencepiece model).

Phi-3 splits text with sentencepiece (tokenizer.py). Phi-4 models use the scheme of GPT-2 and
tiktoken instead, written out in tokenizer.json; encoding a stretch of text (between added tokens)
goes in three steps:

1. Pre-tokenize: the `Split` regex of tokenizer.json cuts the text into words (a run of letters
   with at most one leading non-letter, digits in groups of up to three, punctuation, runs of
   whitespace...); with the "Isolated" behaviour every match is a word, and so is every stretch
   between two matches. No merge ever crosses a word boundary.
2. Bytes as characters: each word's UTF-8 bytes are written one printable character per byte
   (GPT-2's table: a byte that is already printable stands for itself, the others are moved up
   past U+0100, so the space is "Ġ" and the newline "Ċ"). Every byte has a piece of its own, so
   nothing is ever unknown.
3. Merge: repeatedly join the adjacent pair of pieces that comes first in tokenizer.json's
   `merges`, until no adjacent pair is listed; each final piece is a vocabulary entry.

Decoding runs step 2 backwards: pieces -> bytes -> UTF-8 text (an incomplete character at the
end shows as U+FFFD). Unlike sentencepiece, nothing is prepended, so no leading space is dropped.
"""

from __future__ import annotations

import math

from .errors import Phi3Error


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each of the 256 byte values as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + moved)  # 0-32, 127-160 and 173 get the characters after U+00FF
            moved += 1
    return table


# The pattern of a ByteLevel pre-tokenizer with use_regex=true (GPT-2's), when tokenizer.json has no Split.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class ByteLevelBPE:
    """vocab (piece -> id), merges (pairs, first = merged first) and the pre-tokenizer's split pattern."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], split_patterns: list[str],
                 ignore_merges: bool = False, source: str = "tokenizer.json"):
        import regex  # the split patterns use Unicode classes (\p{L}, \p{N}) that `re` lacks

        self.vocab = vocab
        self.piece_of = {i: piece for piece, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.splits = [regex.compile(p) for p in split_patterns]
        self.ignore_merges = ignore_merges  # a whole word that is in the vocabulary is taken as it is
        self.source = source
        self.char_of_byte = bytes_to_unicode()
        self.byte_of_char = {c: b for b, c in self.char_of_byte.items()}
        self._cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[str]:
        """Step 1: every split pattern in turn cuts each word into its matches and the gaps between them."""
        words = [text]
        for pattern in self.splits:
            cut = []
            for word in words:
                start = 0
                for m in pattern.finditer(word):
                    if m.start() > start:
                        cut.append(word[start:m.start()])
                    if m.end() > m.start():
                        cut.append(m.group())
                    start = m.end()
                if start < len(word):
                    cut.append(word[start:])
            words = cut
        return words

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.words(text):
            if word not in self._cache:
                chars = "".join(self.char_of_byte[b] for b in word.encode("utf-8"))  # step 2
                self._cache[word] = [self._id(piece) for piece in self.merge(chars)]
            ids += self._cache[word]
        return ids

    def merge(self, word: str) -> list[str]:
        """Step 3: join the best-ranked adjacent pair (the leftmost among equals) until none is listed."""
        if self.ignore_merges and word in self.vocab:
            return [word]
        pieces = list(word)
        while len(pieces) > 1:
            rank, i = min((self.ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
            if rank == math.inf:
                break
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
        return pieces

    def token_bytes(self, i: int) -> bytes:
        return bytes(self.byte_of_char[c] for c in self.piece_of[i])

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            raise Phi3Error(f"{self.source}: the piece {piece!r} is not in the vocabulary; a byte-level BPE "
                            "vocabulary must hold every single byte and every merge result")
        return self.vocab[piece]

    @classmethod
    def from_tokenizer_json(cls, data: dict, source: str) -> "ByteLevelBPE":
        """Read the model, pre-tokenizer and decoder of a tokenizer.json; refuse what this class does not do."""
        model = data.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise Phi3Error(f"{source}: expected a BPE model with a vocab, got model type {model.get('type')!r}")
        if data.get("normalizer") is not None:
            raise Phi3Error(f"{source}: a normalizer ({data['normalizer'].get('type')!r}) is not supported; "
                            "Phi-4's byte-level tokenizer.json has none")
        steps = _steps(data.get("pre_tokenizer"), "pretokenizers")
        patterns, byte_level = [], False
        for step in steps:
            if step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
                pattern = step.get("pattern") or {}
                patterns.append(pattern["Regex"] if "Regex" in pattern else _escape(pattern.get("String", "")))
            elif step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False):
                byte_level = True
                if step.get("use_regex", True):
                    patterns.append(GPT2_SPLIT)
            else:
                raise Phi3Error(f"{source}: the pre-tokenizer step {step!r:.120} is not supported; expected "
                                "Split (Isolated) and ByteLevel steps, as Phi-4's tokenizer.json has")
        decoders = _steps(data.get("decoder"), "decoders")
        if not byte_level or [d.get("type") for d in decoders] != ["ByteLevel"]:
            raise Phi3Error(f"{source}: expected a byte-level BPE (a ByteLevel pre-tokenizer and decoder); "
                            "this tokenizer.json is another kind")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return cls(model["vocab"], merges, patterns, bool(model.get("ignore_merges", False)), source)


def _steps(component: dict | None, key: str) -> list[dict]:
    if component is None:
        return []
    return component.get(key, []) if component.get("type") == "Sequence" else [component]


def _escape(text: str) -> str:
    import regex

    return regex.escape(text)
