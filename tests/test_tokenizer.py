"""The Phi-3 tokenizer against the published tokenizer.json (run by the `tokenizers` library).

tokenizers' own Tokenizer is the reference rather than transformers' AutoTokenizer, which in
transformers 5 rebuilds this tokenizer and drops the "▁" after an added token (see
docs/TOKENIZER.md). Where the two can differ by design, runs of spaces, the test pins it.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from phi3_scratch.errors import Phi3Error
from phi3_scratch.tokenizer import CHAT_TEMPLATE_PHI3, Tokenizer

from .conftest import FIXTURES, needs_fixture

FOLDER = FIXTURES / "phi3-tokenizer"
needs_tokenizer = needs_fixture(FOLDER)

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
    return Tokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def reference():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(FOLDER / "tokenizer.json"))


@needs_tokenizer
def test_golden_ids(tok):
    assert tok.encode("Beautiful is better than ugly") == [25685, 338, 2253, 1135, 22769]
    chat = [{"role": "user", "content": "What is better than ugly?"},
            {"role": "assistant", "content": "Beautiful."}]
    text = tok.apply_chat_template(chat, add_generation_prompt=False)
    golden = [32010, 1724, 338, 2253, 1135, 22769, 29973, 32007, 32001, 25685, 29889, 32007, 32000]
    assert tok.encode(text) == golden


@needs_tokenizer
def test_special_ids_and_flags(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 32000, 32000, 32011)
    assert tok.stop_ids == [32000, 32001, 32007]
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False) == [7251]  # add_bos_token is false
    assert [tok.id_to_piece(i) for i in (1, 13, 15043, 32007)] == ["<s>", "<0x0A>", "▁Hello", "<|end|>"]


@needs_tokenizer
def test_corpus_matches_tokenizer_json(tok, reference, report):
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
    report(f"tokenizer corpus: {len(CORPUS)} strings, {sum(map(len, CORPUS))} characters, {n_tokens} tokens; "
           f"ids equal to tokenizer.json for all {len(CORPUS) - n_runs} without a run of spaces, "
           f"same text and pieces for the {n_runs} with one ({n_split_differently} of them split differently)")


@needs_tokenizer
def test_space_runs_follow_sentencepiece(tok, reference):
    text = "def f():\n    return 1"
    ours, theirs = tok.encode(text), reference.encode(text, add_special_tokens=False)
    assert [tok.id_to_piece(i) for i in ours] == [
        "▁def", "▁f", "():", "<0x0A>", "▁▁▁", "▁return", "▁", "1",
    ]
    assert ours == [822, 285, 7295, 13, 1678, 736, 29871, 29896]
    assert theirs.tokens == ["▁def", "▁f", "():", "<0x0A>", "▁▁▁▁", "return", "▁", "1"]
    assert theirs.ids == [822, 285, 7295, 13, 268, 2457, 29871, 29896]
    assert tok.decode(ours) == reference.decode(theirs.ids) == text
    assert tok.encode(" hi") == [29871, 7251]  # "▁" "▁hi"; tokenizer.json: "▁▁" "hi"


@needs_tokenizer
def test_added_tokens_strip_whitespace(tok):
    assert tok.encode("<|user|>\n\n  hola<|end|>\n") == [32010, 298, 2963, 32007]
    assert tok.encode("<|user|>hola<|end|>") == [32010, 298, 2963, 32007]
    assert tok.encode("x<|endoftext|>\ny")[:2] == [921, 32000]  # no rstrip on <|endoftext|>
    assert tok.decode([32010, 298, 2963, 32007]) == "<|user|> hola<|end|>"
    assert tok.decode([32010, 298, 2963, 32007], skip_special_tokens=True) == "hola"


@needs_tokenizer
def test_lstrip_and_add_bos_follow_the_config(tmp_path):
    """No Phi-3 token has lstrip: add one, to both, and turn on add_bos_token."""
    tokenizers = pytest.importorskip("tokenizers")

    shutil.copy(FOLDER / "tokenizer.model", tmp_path / "tokenizer.model")
    config = json.loads((FOLDER / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["32011"] = {"content": "<|x|>", "lstrip": True, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = tokenizers.Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    theirs.add_special_tokens([tokenizers.AddedToken("<|x|>", lstrip=True, normalized=False, special=True)])
    for text in ("a \n <|x|>b", "a<|x|>\nb<|end|>  c", "<|x|><|x|>"):
        assert ours.encode(text) == [1] + theirs.encode(text, add_special_tokens=False).ids, text
    assert ours.encode("a", add_special_tokens=False) == [263]


@needs_tokenizer
@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_matches_decode(tok, skip):
    for text in CORPUS:
        ids = tok.encode(text)
        decoder = tok.stream_decoder(skip_special_tokens=skip)
        pushes = [decoder.push(i) for i in ids]
        assert "".join(pushes) == tok.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in p for p in pushes), text


@needs_tokenizer
def test_stream_decoder_holds_bytes_until_a_character_is_whole(tok):
    ids = tok.encode("ok 👍🏽")
    assert [tok.id_to_piece(i) for i in ids] == ["▁ok", "▁", "<0xF0>", "<0x9F>", "<0x91>", "<0x8D>",
                                                 "<0xF0>", "<0x9F>", "<0x8F>", "<0xBD>"]
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["ok", " ", "", "", "", "👍", "", "", "", "🏽"]
    decoder = tok.stream_decoder()
    assert decoder.push(tok.encode("Hi")[0]) == "Hi"  # no leading space at the start of the text
    assert decoder.push(torch.tensor(32007)) == ""  # special, skipped


@needs_tokenizer
def test_decode_takes_a_tensor_and_marks_broken_bytes(tok):
    ids = tok.encode("añ")
    assert tok.decode(torch.tensor(ids)) == "añ"
    broken = [tok.encode("\U0001f44d")[1], *tok.encode("hi")]  # a lone lead byte of "👍", then "▁hi"
    assert tok.decode(broken) == "\ufffd hi"
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in broken] == ["", "\ufffd hi"]


CHATS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "¿Qué hora es, che?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku.\nAbout mate."}],
    [{"role": "user", "content": "  spaces and <|end|> inside  "}],
]


@needs_tokenizer
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS, ids=["system+user", "multi-turn", "odd-content"])
def test_chat_template_matches_transformers(tok, chat, add_generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    config = json.loads((FOLDER / "tokenizer_config.json").read_text())
    names = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (expected,), _ = render_jinja_template(conversations=[chat], chat_template=config["chat_template"],
                                           add_generation_prompt=add_generation_prompt, **names)
    assert tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


@needs_tokenizer
def test_builtin_chat_template_when_config_has_none(tok, tmp_path):
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(FOLDER / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    bare = Tokenizer.from_pretrained(tmp_path)
    assert bare.chat_template == CHAT_TEMPLATE_PHI3
    for chat in CHATS:
        for prompt in (True, False):
            assert bare.apply_chat_template(chat, prompt) == tok.apply_chat_template(chat, prompt)


def test_error_folder_without_tokenizer_model(tmp_path):
    with pytest.raises(Phi3Error, match="tokenizer.model not found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(Phi3Error, match="Phi-4 models ship a BPE tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


@needs_tokenizer
def test_error_unreadable_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(Phi3Error, match="not a readable sentencepiece model"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(FOLDER / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(Phi3Error, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"32000": "<|end|>"}}')
    with pytest.raises(Phi3Error, match="added_tokens_decoder is .*expected entries like"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": "yes"}')
    with pytest.raises(Phi3Error, match="add_bos_token is 'yes'; expected a bool"):
        Tokenizer.from_pretrained(tmp_path)


@needs_tokenizer
def test_added_tokens_from_other_files(tmp_path):
    shutil.copy(FOLDER / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|end|>": 32007, "<|user|>": 32010}))
    assert Tokenizer.from_pretrained(tmp_path).encode("<|user|>hola<|end|>") == [32010, 298, 2963, 32007]
    (tmp_path / "added_tokens.json").unlink()
    shutil.copy(FOLDER / "tokenizer.json", tmp_path / "tokenizer.json")
    assert Tokenizer.from_pretrained(tmp_path).encode("<|user|>\nhola<|end|>\n") == [32010, 298, 2963, 32007]


@needs_tokenizer
def test_error_ids_out_of_range(tok):
    # Phi-3's lm_head has padding rows 32011-32063 that the tokenizer has no piece for: no text.
    assert tok.decode([25685, 32011, 338, 32063]) == tok.decode([25685, 338]) == "Beautiful is"
    assert tok.stream_decoder().push(32050) == "" and tok.id_to_piece(32050) == ""
    with pytest.raises(Phi3Error, match=r"decode\(ids\): element 1 is -3; expected a token id"):
        tok.decode([1, -3])
    with pytest.raises(Phi3Error, match=r"element 0 is -1"):
        tok.stream_decoder().push(-1)
    with pytest.raises(Phi3Error, match="1-D tensor"):
        tok.decode(torch.tensor(5))


@needs_tokenizer
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


@needs_tokenizer
def test_stream_decoder_finish_flushes_an_unfinished_character(tok):
    ids = tok.encode("ok 👍")  # the emoji is four byte pieces
    cut = ids[:-1]  # generation stopped inside the character
    dec = tok.stream_decoder()
    streamed = "".join(dec.push(i) for i in cut)
    assert streamed == "ok "
    assert streamed + dec.finish() == tok.decode(cut) == "ok \ufffd\ufffd\ufffd"
    assert dec.finish() == ""
