"""The tokenizer against tokenizers' own Tokenizer, built in the published tokenizer.json's layout.

Most tests use the built-in tiny model's tokenizer (a sentencepiece BPE with Phi-3's added tokens,
made exactly like Phi-3's: phi3_scratch/data/tiny) and, as the reference, a tokenizer.json rebuilt
from its sentencepiece model in the layout Microsoft publishes for Phi-3 (legacy Llama: prepend
"▁", BPE with byte fallback, the added tokens with their flags). Rebuilt from the real Phi-3
tokenizer.model, that layout gives the published tokenizer.json's ids on the whole corpus (checked
below where the real files are on the machine). The real tokenizer's golden ids need its files:
../shared/fixtures/phi3-tokenizer, or microsoft/Phi-3-mini-4k-instruct in the Hugging Face cache.

tokenizers is the reference rather than transformers' AutoTokenizer, which in transformers 5
rebuilds this tokenizer and drops the "▁" after an added token (see docs/TOKENIZER.md). Where the
two can differ by design, runs of spaces, the test pins it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from phi3_scratch.errors import Phi3Error
from phi3_scratch.loading import TINY
from phi3_scratch.tokenizer import CHAT_TEMPLATE_PHI3, Tokenizer

from .conftest import FIXTURES, train_tiny

REPO = "microsoft/Phi-3-mini-4k-instruct"


def real_tokenizer_folder() -> Path | None:
    """The real Phi-3 tokenizer files: the dev fixtures, else the Hugging Face cache, else None."""
    if (FIXTURES / "phi3-tokenizer" / "tokenizer.model").is_file():
        return FIXTURES / "phi3-tokenizer"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = [try_to_load_from_cache(REPO, name) for name in ("tokenizer.model", "tokenizer_config.json",
                                                             "tokenizer.json")]
    return Path(found[0]).parent if all(isinstance(f, str) for f in found) else None


REAL = real_tokenizer_folder()
needs_real_tokenizer = pytest.mark.skipif(
    REAL is None,
    reason=f"the real Phi-3 tokenizer is absent: it is in the dev workspace's shared/fixtures, or "
           f"`hf download {REPO} tokenizer.model tokenizer.json tokenizer_config.json` puts it in the cache")


def reference_tokenizer(folder: Path):
    """A tokenizers.Tokenizer in the published Phi-3 tokenizer.json layout, from folder's sentencepiece model
    (scripts/train_tiny.py builds it, and ships it with the tiny model)."""
    return train_tiny().tokenizer_json(folder)


CORPUS = [
    # English
    "Beautiful is better than ugly.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife.",
    "Don't panic. The answer is 42, isn't it? \"Yes\", she said -- (probably).",
    "e-mail: someone@example.com, URL: https://example.com/path?q=1&r=two#frag",
    "UPPER lower MiXeD CamelCaseWord snake_case_word kebab-case-word",
    # Rioplatense Spanish
    "¿Vos querés venir? ¡Dale, che!",
    "Che, ¿vos sabés dónde queda la parada del colectivo? Tomate el 152 y bajate en Plaza Italia.",
    "Mirá, si no te gusta el mate amargo, ponele azúcar y listo. ¡No seas boludo!",
    "El ñandú corrió por la pampa; la cigüeña voló sobre el río. Año, niño, pingüino, acción.",
    "¿Tenés ganas de ir a la cancha el domingo? Juegan Boca y River, va a estar re lindo.",
    "Laburé todo el día y estoy hecho pelota; mañana arrancamos temprano, ¿dale?",
    # emoji, including several code points per emoji
    "I love it 👍🏽!",
    "Flags: 🇦🇷 🇺🇾 🇯🇵",
    "Family: 👨‍👩‍👧‍👦 and a heart ❤️ and a rocket 🚀",
    "😀😃😄😁😆",
    "Mate 🧉 y facturas 🥐, ¿qué más querés? 😂",
    # code, tabs, runs of spaces and newlines
    "def f():\n    return 1",
    "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; i++) {\n\tsum += x[i];\n\tif (sum > 10) {\n\t\tbreak;\n\t}\n}",
    "class Foo:\n        def bar(self):\n                pass",
    "x = [1,  2,   3,    4]",
    "col1\tcol2\tcol3\n1\t2\t3\n",
    "line one\n\nline three\n\n\n\nline seven",
    "\n\nstarts with newlines",
    "   leading spaces",
    " one leading space",
    "trailing spaces   ",
    "trailing newline\n",
    "mixed \t tabs \t and spaces",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "<html><body><p class=\"x\">Hola</p></body></html>",
    # added tokens inside text
    "<|user|>\nhola<|end|>\n",
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello!<|end|>\n",
    "text before<|endoftext|>text after",
    "a <|end|> b",
    "<|user|>   spaces after an rstrip token<|end|>",
    "<|placeholder1|><|placeholder6|>",
    "<s>A tag that is also the BOS token</s> and <unk>",
    "x<|endoftext|> y",
    # CJK and other scripts
    "你好，世界！我们今天去公园散步吧。",
    "日本語のテキストです。東京は大きな都市です。",
    "한국어 문장입니다. 안녕하세요!",
    "Привет, как дела? Γειά σου κόσμε. مرحبا بالعالم",
    # numbers
    "3.14159 2.71828 1,000,000 1e-10 0xFF -42 +7",
    "Phone: +54 11 4321-5678. Date: 2024-05-31T12:34:56Z. Price: $1,299.99 (21% IVA).",
    "1234567890 9876543210",
]
ADDED_TOKEN = re.compile(r"<\|\w+\|>|</?s>|<unk>")


def has_space_run(text: str) -> bool:
    """True when a stretch between added tokens, with its "▁" prefix, holds 2+ spaces in a row."""
    return any("  " in " " + piece for piece in ADDED_TOKEN.split(text))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def reference():
    return reference_tokenizer(TINY)


def added_id(tok, content: str) -> int:
    (i,) = tok.encode(content)
    return i


def check_corpus(tok, reference, report, name: str) -> None:
    """Every CORPUS string gives the reference's ids (pieces and text, where a run of spaces is cut
    elsewhere)."""
    n_tokens = n_runs = n_split_differently = 0
    for text in CORPUS:
        ours, theirs = tok.encode(text), reference.encode(text, add_special_tokens=False).ids
        n_tokens += len(ours)
        if has_space_run(text):  # sentencepiece and tokenizer.json may split the run differently
            n_runs += 1
            n_split_differently += ours != theirs
            joined = "".join(reference.id_to_token(i) for i in theirs)
            assert "".join(map(tok.id_to_piece, ours)) == joined, text  # the same "▁" string, cut elsewhere
        else:
            assert ours == theirs, text
        for skip in (False, True):
            expected = reference.decode(theirs, skip_special_tokens=skip)
            assert tok.decode(ours, skip_special_tokens=skip) == expected, text
            assert reference.decode(ours, skip_special_tokens=skip) == expected, text
        if not ADDED_TOKEN.search(text):  # else rstrip has dropped whitespace
            assert tok.decode(ours) == text
    report(f"tokenizer corpus, {name}: {len(CORPUS)} strings, {sum(map(len, CORPUS))} characters, "
           f"{n_tokens} tokens; "
           f"ids equal to tokenizer.json for all {len(CORPUS) - n_runs} without a run of spaces, "
           f"same text and pieces for the {n_runs} with one "
           f"({n_split_differently} of them split differently)")


@needs_real_tokenizer
def test_golden_ids_of_the_real_phi3_tokenizer():
    """Microsoft's published ids, the special ids, a pinned space run, and the built-in chat template."""
    tok = Tokenizer.from_pretrained(REAL)
    assert tok.encode("Beautiful is better than ugly") == [25685, 338, 2253, 1135, 22769]
    chat = [{"role": "user", "content": "What is better than ugly?"},
            {"role": "assistant", "content": "Beautiful."}]
    text = tok.apply_chat_template(chat, add_generation_prompt=False)
    golden = [32010, 1724, 338, 2253, 1135, 22769, 29973, 32007, 32001, 25685, 29889, 32007, 32000]
    assert tok.encode(text) == golden
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 32000, 32000, 32011)
    assert tok.stop_ids == [32000, 32001, 32007]
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False) == [7251]  # add_bos_token is false
    assert [tok.id_to_piece(i) for i in (1, 13, 15043, 32007)] == ["<s>", "<0x0A>", "▁Hello", "<|end|>"]
    assert tok.encode("<|user|>\n\n  hola<|end|>\n") == [32010, 298, 2963, 32007]
    # Runs of spaces: sentencepiece's split, not tokenizer.json's ("▁▁▁▁" "return").
    assert [tok.id_to_piece(i) for i in tok.encode("def f():\n    return 1")] == [
        "▁def", "▁f", "():", "<0x0A>", "▁▁▁", "▁return", "▁", "1"]
    assert tok.encode(" hi") == [29871, 7251]  # "▁" "▁hi"; tokenizer.json: "▁▁" "hi"
    # With no chat_template in tokenizer_config.json, the built-in one renders what Phi-3's does.
    bare = Tokenizer(tok._sp, list(tok._added.values()), {"eos_token": "<|endoftext|>"})
    assert bare.chat_template == CHAT_TEMPLATE_PHI3
    for chat in CHATS:
        for prompt in (True, False):
            assert bare.apply_chat_template(chat, prompt) == tok.apply_chat_template(chat, prompt)


@needs_real_tokenizer
def test_corpus_matches_the_published_tokenizer_json(report):
    """The real Phi-3 tokenizer against the published tokenizer.json, and the rebuilt reference against
    both."""
    import tokenizers
    published = tokenizers.Tokenizer.from_file(str(REAL / "tokenizer.json"))
    tok, rebuilt = Tokenizer.from_pretrained(REAL), reference_tokenizer(REAL)
    for text in CORPUS:
        assert (rebuilt.encode(text, add_special_tokens=False).ids
                == published.encode(text, add_special_tokens=False).ids)
    check_corpus(tok, published, report, "real Phi-3")


def test_special_ids_and_flags(tok):
    eot, assistant, end = (added_id(tok, t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, eot, eot)
    assert tok.vocab_size == eot + 11  # Phi-3's eleven added tokens right after the pieces
    assert tok.stop_ids == sorted([eot, assistant, end])
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # add_bos_token is false
    assert [tok.id_to_piece(i) for i in (1, 13, eot + 7)] == ["<s>", "<0x0A>", "<|end|>"]


def test_corpus_matches_tokenizer_json(tok, reference, report):
    check_corpus(tok, reference, report, "tiny model")


def test_space_runs_follow_sentencepiece(tok, reference):
    sp = spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model"))
    differ = 0
    assert sp.encode("x  =  1") != sp.encode("x = 1")  # runs of spaces really are kept
    for text in [t for t in CORPUS if has_space_run(t) and not ADDED_TOKEN.search(t)]:
        ours, theirs = tok.encode(text), reference.encode(text, add_special_tokens=False).ids
        assert ours == sp.encode(text), text  # sentencepiece's own split of the run
        assert tok.decode(ours) == reference.decode(theirs) == text
        differ += ours != theirs
    # The tiny vocabulary happens to split every run of the corpus alike both ways; the real Phi-3
    # tokenizer does not ("▁▁▁" "▁return" vs "▁▁▁▁" "return"): test_golden_ids_of_the_real_phi3_tokenizer.
    assert differ == 0


def test_added_tokens_strip_whitespace(tok):
    user, end, eot = (added_id(tok, t) for t in ("<|user|>", "<|end|>", "<|endoftext|>"))
    hola = tok.encode("hola")
    assert tok.encode("<|user|>\n\n  hola<|end|>\n") == [user, *hola, end]
    assert tok.encode("<|user|>hola<|end|>") == [user, *hola, end]
    # no rstrip
    assert tok.encode("x<|endoftext|>\ny")[len(tok.encode("x")):][:2] == [eot, *tok.encode("\ny")[:1]]
    assert tok.decode([user, *hola, end]) == "<|user|> hola<|end|>"
    assert tok.decode([user, *hola, end], skip_special_tokens=True) == "hola"


def test_added_tokens_strip_the_whitespace_tokenizers_strips(tok):
    """Tokenizer whitespace quirk: rstrip takes tabs, carriage returns, Unicode spaces and separators
    too (what `tokenizers` strips), not only spaces and newlines."""
    reference = reference_tokenizer(TINY)
    for text in ["<|user|>\thola<|end|>\r\nx", "<|user|>\u00a0\u3000hola<|end|>", "<|end|>\x1chi"]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, repr(text)


def test_lstrip_and_add_bos_follow_the_config(tmp_path, tok):
    """No Phi-3 token has lstrip: add one, to both, and turn on add_bos_token."""
    import tokenizers

    shutil.copy(TINY / "tokenizer.model", tmp_path / "tokenizer.model")
    config = json.loads((TINY / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(tok.vocab_size)] = {"content": "<|x|>", "lstrip": True,
                                                           "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = reference_tokenizer(TINY)
    theirs.add_special_tokens([tokenizers.AddedToken("<|x|>", lstrip=True, normalized=False, special=True)])
    for text in ("a \n <|x|>b", "a<|x|>\nb<|end|>  c", "<|x|><|x|>"):
        assert ours.encode(text) == [1] + theirs.encode(text, add_special_tokens=False).ids, text
    assert ours.encode("a", add_special_tokens=False) == tok.encode("a")


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_matches_decode(tok, skip):
    for text in CORPUS:
        ids = tok.encode(text)
        decoder = tok.stream_decoder(skip_special_tokens=skip)
        pushes = [decoder.push(i) for i in ids]
        assert "".join(pushes) == tok.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in p for p in pushes), text


def test_stream_decoder_holds_bytes_until_a_character_is_whole(tok):
    ids = tok.encode("ok 🦙🏽")  # two characters the tiny vocabulary has no piece for
    emoji = [tok.id_to_piece(i) for i in ids[-8:]]
    # byte fallback
    assert emoji == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>", "<0xF0>", "<0x9F>", "<0x8F>", "<0xBD>"]
    decoder = tok.stream_decoder()
    pushes = [decoder.push(i) for i in ids]
    assert "".join(pushes[:-8]) == "ok " and pushes[-8:] == ["", "", "", "🦙", "", "", "", "🏽"]
    decoder = tok.stream_decoder()
    # no leading space
    assert decoder.push(tok.encode("Hi")[0]) == tok.id_to_piece(tok.encode("Hi")[0]).lstrip("▁")
    assert decoder.push(torch.tensor(added_id(tok, "<|end|>"))) == ""  # special, skipped


def test_decode_takes_a_tensor_and_marks_broken_bytes(tok):
    ids = tok.encode("añ")
    assert tok.decode(torch.tensor(ids)) == "añ"
    lead = [i for i in tok.encode("\U0001f999") if tok.id_to_piece(i) == "<0xF0>"]  # the lead byte of "🦙"
    broken = [*lead, *tok.encode("hi")]  # ... alone, then "▁hi"
    assert tok.decode(broken) == "\ufffd hi"
    decoder = tok.stream_decoder()
    assert "".join(decoder.push(i) for i in broken) == "\ufffd hi"


CHATS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "¿Qué hora es, che?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku.\nAbout mate."}],
    [{"role": "user", "content": "  spaces and <|end|> inside  "}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS, ids=["system+user", "multi-turn", "odd-content"])
def test_chat_template_matches_transformers(tok, chat, add_generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    config = json.loads((TINY / "tokenizer_config.json").read_text())
    names = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (expected,), _ = render_jinja_template(conversations=[chat], chat_template=config["chat_template"],
                                           add_generation_prompt=add_generation_prompt, **names)
    assert tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


def test_builtin_chat_template_when_config_has_none(tok, tmp_path):
    shutil.copy(TINY / "tokenizer.model", tmp_path / "tokenizer.model")
    config = json.loads((TINY / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    bare = Tokenizer.from_pretrained(tmp_path)
    assert bare.chat_template == CHAT_TEMPLATE_PHI3
    assert bare.apply_chat_template(CHATS[0]) == tok.apply_chat_template(CHATS[0])


def with_config(tmp_path, **changes) -> Tokenizer:
    """The tiny tokenizer with tokenizer_config.json's fields changed."""
    shutil.copy(TINY / "tokenizer.model", tmp_path / "tokenizer.model")
    config = {**json.loads((TINY / "tokenizer_config.json").read_text()), **changes}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_pretrained(tmp_path)


def test_a_message_the_chat_template_leaves_out_is_an_error(tok, tmp_path):
    """Phi-3's template skips a role it does not know without a word: the user's text would be lost."""
    with pytest.raises(Phi3Error, match=r"this checkpoint's chat template left out message 1 \(role 'usr'\)"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                 {"role": "usr", "content": "hi"}])
    broken = with_config(tmp_path, chat_template="{{ 1 / 0 }}")
    with pytest.raises(Phi3Error, match="the chat template failed: ZeroDivisionError"):
        broken.apply_chat_template(CHATS[0])


def test_error_token_names_that_are_not_strings(tmp_path):
    with pytest.raises(Phi3Error, match="tokenizer_config.json: eos_token is 5; expected a token string"):
        with_config(tmp_path, eos_token=5)
    decoder = json.loads((TINY / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    first = next(iter(decoder))
    # "false" would read as true
    with pytest.raises(Phi3Error, match="added_tokens_decoder is .*; expected entries like"):
        with_config(tmp_path, added_tokens_decoder={**decoder, first: {**decoder[first], "rstrip": "false"}})


def test_error_folder_without_tokenizer_model(tmp_path):
    with pytest.raises(Phi3Error, match="tokenizer.model not found, and no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # read as Phi-4's byte-level BPE: it is not one
    with pytest.raises(Phi3Error,
                       match="tokenizer.json: expected a BPE model with a vocab, got model type None"):
        Tokenizer.from_pretrained(tmp_path)


def test_error_unreadable_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(Phi3Error, match="not a readable sentencepiece model"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(TINY / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(Phi3Error, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"32000": "<|end|>"}}')
    with pytest.raises(Phi3Error, match="added_tokens_decoder is .*expected entries like"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": "yes"}')
    with pytest.raises(Phi3Error, match="add_bos_token is 'yes'; expected a bool"):
        Tokenizer.from_pretrained(tmp_path)


def test_added_tokens_from_other_files(tmp_path, tok, reference):
    user, end = added_id(tok, "<|user|>"), added_id(tok, "<|end|>")
    expected = [user, *tok.encode("hola"), end]
    shutil.copy(TINY / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|end|>": end, "<|user|>": user}))
    assert Tokenizer.from_pretrained(tmp_path).encode("<|user|>hola<|end|>") == expected
    (tmp_path / "added_tokens.json").unlink()
    reference.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_pretrained(tmp_path).encode("<|user|>\nhola<|end|>\n") == expected


def test_error_ids_out_of_range(tok):
    # Like Phi-3's (32011 ids, 32064 rows), the tiny model's lm_head has padding rows the tokenizer has
    # no piece for: they decode to no text.
    words = tok.encode("Beautiful is")
    padding = [tok.vocab_size, tok.vocab_size + 20]
    assert tok.decode([words[0], padding[0], *words[1:], padding[1]]) == tok.decode(words) == "Beautiful is"
    assert tok.stream_decoder().push(padding[1]) == "" and tok.id_to_piece(padding[1]) == ""
    with pytest.raises(Phi3Error, match=r"decode\(ids\): element 1 is -3; expected a token id"):
        tok.decode([1, -3])
    with pytest.raises(Phi3Error, match=r"element 0 is -1"):
        tok.stream_decoder().push(-1)
    with pytest.raises(Phi3Error, match="1-D tensor"):
        tok.decode(torch.tensor(5))


@pytest.mark.parametrize("messages", [
    "hello",
    [],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [("user", "hi")],
])
def test_error_bad_messages(tok, messages):
    with pytest.raises(Phi3Error, match=r"apply_chat_template\(messages\)"):
        tok.apply_chat_template(messages)


def test_stream_decoder_finish_flushes_an_unfinished_character(tok):
    ids = tok.encode("ok 🦙")  # the emoji is four byte pieces
    cut = ids[:-1]  # generation stopped inside the character
    dec = tok.stream_decoder()
    streamed = "".join(dec.push(i) for i in cut)
    assert streamed == "ok "
    assert streamed + dec.finish() == tok.decode(cut) == "ok \ufffd\ufffd\ufffd"
    assert dec.finish() == ""
