"""Phi-4's tokenizer: a byte-level BPE in tokenizer.json (phi3_scratch/bpe.py), against transformers'.

Phi-4-mini and phi-4 ship no sentencepiece model. The tests build tokenizer.json files in their
layout with the `tokenizers` library (a Split pre-tokenizer with a tiktoken-style regex, then
ByteLevel; a BPE trained here on mixed text; added tokens for the chat), one with each family
member's split pattern, and compare this project's Tokenizer with transformers' tokenizer on the
same file: ids, decoding with and without special tokens, streaming, the chat template.
"""

import json

import pytest
import tokenizers

from phi3_scratch.tokenizer import Tokenizer

from .test_tokenizer import CORPUS

# Phi-4-mini's split pattern is tiktoken's o200k (letters with case classes, marks, 1-3 digits);
# phi-4's is cl100k's (contractions first, letters, 1-3 digits).
PATTERNS = {
    "phi-4-mini (o200k)": "|".join([
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"]),
    "phi-4 (cl100k)": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
ADDED = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
TRAINING = CORPUS * 3 + ["Phi-4-mini tokenizes with a byte-level BPE of 200,064 entries; phi-4 with 100,352.",
                         "¿Cómo andás? Todo bien, che. Años, niños, pingüinos y acción.", "def main():\n    return 0\n"]
TEXTS = CORPUS + ["They'll say it's DONE, isn't it? I'VE seen 12345678 cats.", "\t\t  mixed  \n\n  whitespace \r\n",
                  "ünïcödé ñ ÅNGSTRÖM ﬁ ǅ", "x" * 40]


def build(folder, pattern: str, ignore_merges: bool):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAINING, trainer)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in ADDED])
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ADDED}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "chat_template": TEMPLATE, "add_bos_token": False,
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
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
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
    assert ours.stop_ids == sorted(theirs.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>"))


def test_what_is_not_a_byte_level_bpe_is_refused(tmp_path):
    from phi3_scratch.errors import Phi3Error

    folder = build(tmp_path, PATTERNS["phi-4 (cl100k)"], False)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(Phi3Error, match="expected a byte-level BPE"):
        Tokenizer.from_pretrained(folder)
