"""Phi-4's tokenizer: a byte-level BPE in tokenizer.json (phi3_scratch/bpe.py), against transformers'.

Phi-4-mini and phi-4 ship no sentencepiece model. The tests build tokenizer.json files in their
layout with the `tokenizers` library (a Split pre-tokenizer with a tiktoken-style regex, then
ByteLevel; a BPE trained here on mixed text; added tokens for the chat), one with each family
member's split pattern, and compare this project's Tokenizer with transformers' tokenizer on the
same file: ids, decoding with and without special tokens, streaming, the chat template. Long
words (runs of one character, base64, minified code, mixed scripts) are compared with the
`tokenizers` library itself, and the word cache is checked to stay bounded.
"""

import base64
import json
import random

import pytest
import tokenizers

from phi3_scratch.bpe import ByteLevelBPE
from phi3_scratch.errors import Phi3Error
from phi3_scratch.tokenizer import Tokenizer

from .test_tokenizer import CORPUS

# Phi-4-mini's split pattern is tiktoken's o200k (letters with case classes, marks, 1-3 digits);
# phi-4's is cl100k's (contractions first, letters, 1-3 digits).
PATTERNS = {
    "phi-4-mini (o200k)": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "phi-4 (cl100k)": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
ADDED = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
TRAINING = CORPUS * 3 + ["Phi-4-mini tokenizes with a byte-level BPE of 200,064 entries; phi-4 with 100,352.",
                         "¿Cómo andás? Todo bien, che. Años, niños, pingüinos y acción.",
                         "def main():\n    return 0\n"]
TEXTS = CORPUS + ["They'll say it's DONE, isn't it? I'VE seen 12345678 cats.",
                  "\t\t  mixed  \n\n  whitespace \r\n", "ünïcödé ñ ÅNGSTRÖM ﬁ ǅ", "x" * 40]


def build(folder, pattern: str, ignore_merges: bool, training: list[str] = TRAINING, vocab_size: int = 700):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training, trainer)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in ADDED])
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ADDED}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE,
        "add_bos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in ids.items()}}))
    return folder


@pytest.fixture(scope="module", params=[(name, ignore) for name in PATTERNS for ignore in (False, True)],
                ids=lambda p: f"{p[0]}{', ignore_merges' if p[1] else ''}")
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer

    name, ignore_merges = request.param
    folder = build(tmp_path_factory.mktemp("bpe"), PATTERNS[name], ignore_merges)
    return Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(str(folder))


def test_ids_and_text_equal_transformers(pair, report):
    ours, theirs = pair
    n = 0
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            expected = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, text
        if "<|" not in text:
            assert ours.decode(ids) == text  # byte-level: every text comes back exactly
        n += len(ids)
    report(f"byte-level BPE: {len(TEXTS)} strings, {n} tokens, ids and text equal to transformers'")


def test_streaming_and_broken_bytes(pair):
    ours, _ = pair
    for text in TEXTS:
        ids = ours.encode(text)
        decoder = ours.stream_decoder(skip_special_tokens=False)
        assert "".join(decoder.push(i) for i in ids) + decoder.finish() == ours.decode(ids), text
    ids = ours.encode("ok 🦙")  # an emoji the training text never had: its 4 bytes span several tokens
    assert ours.decode(ids[-1:]) == "\ufffd"  # the last token alone is no character
    decoder = ours.stream_decoder()
    streamed = "".join(decoder.push(i) for i in ids[:-1])  # generation stopped inside the character
    assert streamed == "ok " and decoder.finish() == "\ufffd" and decoder.finish() == ""
    assert ours.decode(ids[:-1]) == "ok \ufffd"


def test_chat_template_and_added_tokens(pair):
    ours, theirs = pair
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "¿Qué es la caché KV?"}]
    text = ours.apply_chat_template(chat)
    assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode("<|user|>")[0] == theirs.convert_tokens_to_ids("<|user|>")
    assert ours.eos_token_id == theirs.convert_tokens_to_ids("<|endoftext|>")
    stops = ("<|endoftext|>", "<|assistant|>", "<|end|>")
    assert ours.stop_ids == sorted(theirs.convert_tokens_to_ids(t) for t in stops)


def test_what_is_not_a_byte_level_bpe_is_refused(tmp_path):
    from phi3_scratch.errors import Phi3Error

    folder = build(tmp_path, PATTERNS["phi-4 (cl100k)"], False)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(Phi3Error, match="expected a byte-level BPE"):
        Tokenizer.from_pretrained(folder)


# Long words: what a tokenizer meets in minified code, base64 or a run of one character. Each text is
# several thousand characters; the old merge loop rescanned the word for every merge (O(n^2)).
_RNG = random.Random(0)
# Latin, Cyrillic, Greek, CJK, Hangul, Arabic, emoji, a skin-tone modifier
MIXED = "aéßжЖдλΩ中文字한글ع🦙👍🏽"


def minified_code(rng: random.Random, n: int) -> str:
    """About n characters of JavaScript-like code without spaces or newlines."""
    parts = []
    while sum(map(len, parts)) < n:
        a, b = rng.choice("abcxyz_$"), rng.choice(["e", "t", "i", "n"])
        parts.append(rng.choice([f"function {a}({a},{b}){{return {a}+{b}*{rng.randint(0, 999)}}};",
                                 f"var {a}{b}=[{rng.randint(0, 99)},{rng.randint(0, 9)}].map(({b})=>{b}>>1);",
                                 f"if({a}==={b}){{{a}.push('{rng.choice(MIXED[:4])}');}}else{{{b}--;}}"]))
    return "".join(parts)


LONG_WORDS = {
    "run of 'a' (odd length)": "a" * 5001,
    "run of spaces": " " * 4097,
    "run of '='": "=" * 3001,
    "base64 of random bytes": base64.b64encode(_RNG.randbytes(3000)).decode(),
    "minified code": minified_code(_RNG, 5000),
    "mixed scripts and emoji": "".join(_RNG.choice(MIXED) for _ in range(3000)),
}
# Training on shorter samples of each kind gives the vocabulary merges that apply to long words
# (runs of "a" merge into "aa", "aaaa", ... as in real vocabularies).
LONG_TRAINING = TRAINING + ["a" * 64, " " * 64, "=" * 64, base64.b64encode(_RNG.randbytes(900)).decode(),
                            minified_code(_RNG, 1500), "".join(_RNG.choice(MIXED) for _ in range(600))]


@pytest.fixture(scope="module", params=list(PATTERNS))
def long_file(request, tmp_path_factory):
    """(tokenizer.json trained with long-word samples, tokenizers.Tokenizer of that file)."""
    folder = build(tmp_path_factory.mktemp("bpe-long"), PATTERNS[request.param], False, LONG_TRAINING, 1500)
    return folder / "tokenizer.json", tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def read(path) -> ByteLevelBPE:
    """Our BPE of a tokenizer.json, with an empty word cache."""
    return ByteLevelBPE.from_tokenizer_json(json.loads(path.read_text()), str(path))


@pytest.mark.parametrize("kind", list(LONG_WORDS))
def test_long_words_give_the_ids_of_tokenizers(long_file, kind):
    path, theirs = long_file
    text = LONG_WORDS[kind]
    ids = read(path).encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text.encode()), "expected the vocabulary to have merges for this text"


@pytest.mark.parametrize("kind", list(LONG_WORDS))
def test_one_long_word_merges_as_tokenizers_model_does(long_file, kind):
    """The merge step alone, on the whole text as one word: no split cuts base64 or code short."""
    path, theirs = long_file
    ours = read(path)
    word = "".join(ours.char_of_byte[b] for b in LONG_WORDS[kind].encode())
    assert ours.merge(word) == [t.value for t in theirs.model.tokenize(word)]


def test_equal_ranks_join_the_leftmost_pair_first():
    """In a run of one character every pair is the same pair: the leftmost must be joined first."""
    from tokenizers import models

    vocab, merges = {"a": 0, "aa": 1, "aaa": 2}, [("a", "a"), ("aa", "a")]
    ours, theirs = ByteLevelBPE(vocab, merges, []), models.BPE(vocab, merges)
    assert ours.merge("aaa") == ["aaa"]  # "aa" "a", then "aaa"; the other order would end "a" "aa"
    assert ours.merge("aaaaa") == ["aa", "aaa"]  # "aa" "aa" "a", then the rank-1 pair "aa" "a"
    for n in range(1, 40):
        assert ours.merge("a" * n) == [t.value for t in theirs.tokenize("a" * n)], n


def test_word_cache_stays_bounded_on_many_distinct_words(long_file):
    path, theirs = long_file
    ours = read(path)
    letters = "bcdfghjklmnpqrstvwxz"  # 20 ** 4 distinct words of four letters
    n = ours.CACHE_CAPACITY + 500
    words = [" " + "".join(letters[i // 20 ** k % 20] for k in range(4)) for i in range(n)]
    text = "".join(words)
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids
    assert len(ours._cache) == ours.CACHE_CAPACITY  # full, and no larger, after 10,500 distinct words
    assert words[-1] not in ours._cache
    assert ours.encode(words[-1]) == theirs.encode(words[-1], add_special_tokens=False).ids


def test_long_words_are_not_cached(long_file):
    ours = read(long_file[0])
    ours.encode("a" * 300 + " " + "a" * 10)
    assert list(ours._cache) == [" " + "a" * 10]  # the 300-byte word is over the 256-byte limit
    with pytest.raises(Phi3Error, match=r"cache_capacity must be an int >= 0 .*got -1"):
        ByteLevelBPE(ours.vocab, [], [], cache_capacity=-1)
