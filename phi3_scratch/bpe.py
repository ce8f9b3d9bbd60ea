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
   `merges`, until no adjacent pair is listed; each final piece is a vocabulary entry. A heap of
   pairs makes this O(n log n) for a word of n bytes (see `merge`), so minified code, base64 or a
   run of one character cost no more per byte than prose.

Decoding runs step 2 backwards: pieces -> bytes -> UTF-8 text (an incomplete character at the
end shows as U+FFFD). Unlike sentencepiece, nothing is prepended, so no leading space is dropped.
"""

from __future__ import annotations

import heapq

from .errors import Phi3Error, is_integer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each of the 256 byte values as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
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

    # The word cache is bounded as in the `tokenizers` library (its utils/cache.rs). There it holds
    # 10,000 words by default. Once full, it stores no new word and evicts none. A word of 256 bytes or
    # more is never stored, as it is unlikely to come again. (tokenizers counts the UTF-8 bytes of the
    # byte-level string, up to twice the word's bytes.) So a stream of new words cannot grow memory.
    CACHE_CAPACITY = 10_000
    CACHE_MAX_BYTES = 256

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], split_patterns: list[str],
                 ignore_merges: bool = False, source: str = "tokenizer.json",
                 cache_capacity: int = CACHE_CAPACITY):
        if not is_integer(cache_capacity) or cache_capacity < 0:
            raise Phi3Error(f"cache_capacity must be an int >= 0 (words kept; 0 turns the cache off), "
                            f"got {cache_capacity!r}")
        import regex  # the split patterns use Unicode classes (\p{L}, \p{N}) that `re` lacks

        self.vocab = vocab
        self.piece_of = {i: piece for piece, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.splits = [regex.compile(p) for p in split_patterns]
        self.ignore_merges = ignore_merges  # a whole word that is in the vocabulary is taken as it is
        self.source = source
        self.char_of_byte = bytes_to_unicode()
        self.byte_of_char = {c: b for b, c in self.char_of_byte.items()}
        self.cache_capacity = cache_capacity
        self._cache: dict[str, list[int]] = {}  # word -> its ids

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
        """The ids of `text`: its words (step 1), each as bytes (step 2), merged (step 3)."""
        ids = []
        for word in self.words(text):
            cached = self._cache.get(word)
            if cached is None:
                chars = "".join(self.char_of_byte[b] for b in word.encode("utf-8"))  # step 2
                cached = [self._id(piece) for piece in self.merge(chars)]
                if len(chars) < self.CACHE_MAX_BYTES and len(self._cache) < self.cache_capacity:
                    self._cache[word] = cached
            ids += cached
        return ids

    def merge(self, word: str) -> list[str]:
        """The pieces of one word (step 3): the best-ranked adjacent pair, the leftmost among equals,
        is joined until no adjacent pair is listed in merges.

        Rescanning the word for every merge would cost O(n^2). Instead a heap holds each adjacent pair
        as (rank, position of its left piece), so the pair to join is always on top. The pieces form a
        linked list over the word's positions: `after[i]` is the position of the piece after piece i.
        A join changes two pieces, so heap entries that name either are stale; they are skipped when
        popped. Ties in rank go to the smaller position, the leftmost pair, as in `tokenizers`: in
        "aaa" the first two a's are joined, giving "aa" "a".
        """
        if self.ignore_merges and word in self.vocab:
            return [word]
        n = len(word)
        pieces = list(word)  # pieces[i]: the piece that starts at position i; "" once joined to its left
        after = list(range(1, n + 1))  # n: no piece after
        before = list(range(-1, n - 1))  # -1: no piece before
        heap = [pair for i in range(n - 1) if (pair := self._pair(pieces, i, i + 1))]
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = after[i]
            # Pieces only grow: while piece i keeps its string, j is still its neighbour.
            if pieces[i] != left or pieces[j] != right:
                continue
            pieces[i], pieces[j] = left + right, ""
            after[i] = after[j]
            if after[i] < n:
                before[after[i]] = i
            for a, b in ((before[i], i), (i, after[i])):  # the two new neighbour pairs
                if a >= 0 and b < n and (pair := self._pair(pieces, a, b)):
                    heapq.heappush(heap, pair)
        return [piece for piece in pieces if piece]

    def _pair(self, pieces: list[str], i: int, j: int) -> tuple | None:
        """The heap entry of neighbours i and j: (rank, i, left piece, right piece); None if unlisted."""
        rank = self.ranks.get((pieces[i], pieces[j]))
        return None if rank is None else (rank, i, pieces[i], pieces[j])

    def token_bytes(self, i: int) -> bytes:
        return bytes(self.byte_of_char[c] for c in self.piece_of[i])

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            raise Phi3Error(f"{self.source}: the piece {piece!r} is not in the vocabulary; a byte-level BPE "
                            "vocabulary must hold every single byte and every merge result")
        return self.vocab[piece]

    @classmethod
    def from_tokenizer_json(cls, data: dict, source: str) -> ByteLevelBPE:
        """The BPE that a tokenizer.json's model, pre-tokenizer and decoder describe.

        What this class cannot run is refused with a Phi3Error.
        """
        model = data.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise Phi3Error(f"{source}: expected a BPE model with a vocab, "
                            f"got model type {model.get('type')!r}")
        if data.get("normalizer") is not None:
            raise Phi3Error(f"{source}: a normalizer ({data['normalizer'].get('type')!r}) is not supported; "
                            "Phi-4's byte-level tokenizer.json has none")
        steps = _steps(data.get("pre_tokenizer"), "pretokenizers")
        patterns, byte_level = [], False
        for step in steps:
            if step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
                pattern = step.get("pattern") or {}
                regex_text = pattern["Regex"] if "Regex" in pattern else _escape(pattern.get("String", ""))
                patterns.append(regex_text)
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
