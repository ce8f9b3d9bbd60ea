"""Phi-3's tokenizer: text <-> token ids, and the chat template that turns messages into a prompt.

Phi-3 and Phi-3.5 reuse Llama 2's sentencepiece model (`tokenizer.model`), a BPE over 32000 pieces:
- a space is written "▁", and every piece of text gets one leading "▁" (add_dummy_prefix);
- a character outside the vocabulary falls back to its UTF-8 bytes, one piece "<0xNN>" per byte
  (byte fallback: "👍" is 4 pieces).
On top of that, tokenizer_config.json lists the added tokens, ids 32000-32010 (<|endoftext|>,
<|user|>, <|assistant|>, <|end|>, ...). Sentencepiece knows nothing about them. Encoding therefore
goes in two steps:

1. Find the added tokens in the raw text, longest first.
   A token with `rstrip` swallows the whitespace right after it: the "\n" the chat template writes
   after <|user|> never reaches the model. One with `lstrip` swallows the whitespace before it.
2. Encode each stretch of text between them with sentencepiece on its own, "▁" prefix included.

No BOS is added by default (Phi-3's `add_bos_token` is false). Every entry of
added_tokens_decoder is matched, <s>, </s> and <unk> included, as transformers and the published
tokenizer.json do: a template that writes `{{ bos_token }}` must get id 1 back.

Runs of spaces are split as sentencepiece splits them, which can differ from the published
tokenizer.json ("\\n    return": sentencepiece "▁▁▁" "▁return", tokenizer.json "▁▁▁▁" "return"):
the decoded text is the same, and sentencepiece is the tokenizer Microsoft trained with.
Decoding follows tokenizer.json's decoder: "▁" -> " ", byte pieces joined into UTF-8, one leading
space dropped; see docs/TOKENIZER.md.

Phi-4-mini and phi-4 ship no tokenizer.model but a byte-level BPE in tokenizer.json: the same
class reads it (bpe.py explains that scheme); added tokens, the chat template and streaming work
the same way, and decoding is bytes -> UTF-8, with no leading space to drop.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .bpe import ByteLevelBPE
from .config import read_json
from .errors import Phi3Error
from .streaming import ByteStreamDecoder, StreamDecoder

# Phi-3-mini's template: <|role|>\n{content}<|end|>\n per message, then the assistant's turn.
CHAT_TEMPLATE_PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Unicode White_Space, what tokenizers' lstrip/rstrip test (str.isspace would add \x1c-\x1f).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008" \
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
LEADING_WHITESPACE = re.compile(f"[{re.escape(WHITESPACE)}]*")
CONTINUE_MARK = "PHI3_SCRATCH_CONTINUE_HERE "  # apply_chat_template cuts the text here to continue a message


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool = True  # dropped by decode(skip_special_tokens=True)
    lstrip: bool = False
    rstrip: bool = False


class Tokenizer:
    """A sentencepiece model (Phi-3) or a byte-level BPE (Phi-4, bpe.py), plus the added tokens and
    settings of tokenizer_config.json."""

    def __init__(self, model: spm.SentencePieceProcessor | ByteLevelBPE, added: list[AddedToken],
                 config: dict, chat_template: str | None = None):
        self.files: dict[str, bytes] = {}  # the files from_pretrained read: what save_pretrained writes
        if isinstance(model, ByteLevelBPE):  # Phi-4: no sentencepiece, no byte pieces, no "▁"
            self._sp, self._bpe = None, model
            self._setup(added, config, chat_template, max(model.piece_of) + 1, (-1, -1, -1))
            return
        self._sp = sp = model
        self._bpe = None
        self._setup(added, config, chat_template, sp.get_piece_size(),
                    (sp.bos_id(), sp.eos_id(), sp.pad_id()))
        # For decoding: the text of every id (None in gaps between ids), and the byte of each "<0xNN>" piece.
        self._text: list[str | None] = [None] * self.vocab_size
        self._byte: dict[int, int] = {}
        for i in range(sp.get_piece_size()):
            self._text[i] = sp.id_to_piece(i).replace("▁", " ")
            if sp.is_byte(i):
                self._byte[i] = int(sp.id_to_piece(i)[3:5], 16)
        for t in added:
            self._text[t.id] = t.content.replace("▁", " ")
            self._byte.pop(t.id, None)

    def _setup(self, added: list[AddedToken], config: dict, chat_template: str | None, pieces: int,
               defaults: tuple[int, int, int]) -> None:
        """What every tokenizer here has: the added tokens, the special ids, the chat template."""
        self._added = {t.content: t for t in added}
        self._added_by_id = {t.id: t for t in added}
        longest_first = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")  # (?!) never matches
        self.vocab_size = max([pieces] + [t.id + 1 for t in added])
        self.add_bos, self.add_eos = config.get("add_bos_token", False), config.get("add_eos_token", False)
        # Token strings are "<s>" or {"content": "<s>", ...}; the template sees them as strings.
        names = {key: config.get(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self._names = {k: v.get("content") if isinstance(v, dict) else v
                       for k, v in names.items() if v is not None}
        for key, content in self._names.items():
            if not isinstance(content, str):
                raise Phi3Error(f"tokenizer_config.json: {key} is {content!r:.60}; "
                                "expected a token string like '<s>'")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            self._named_id(key, default)
            for key, default in zip(("bos_token", "eos_token", "pad_token"), defaults))
        self.chat_template = chat_template or config.get("chat_template") or CHAT_TEMPLATE_PHI3
        # The environment transformers renders chat templates in
        # (Hub templates are untrusted code: sandboxed).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(self.chat_template)
        except TemplateError as e:
            raise Phi3Error(f"the chat_template of tokenizer_config.json or chat_template.jinja is not "
                            f"valid Jinja: {e}") from None

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path) -> Tokenizer:
        """A folder with tokenizer.model (+ tokenizer_config.json), or a repo id to download."""
        # Imported here, not at the top: loading imports torch.
        from .loading import TOKENIZER_FILES, resolve_checkpoint
        from .saving import TOKENIZER_NAMES

        folder = resolve_checkpoint(path_or_repo_id, TOKENIZER_FILES, what="tokenizer folder")
        model, bpe = folder / "tokenizer.model", folder / "tokenizer.json"
        if model.is_file():  # Phi-3: a sentencepiece model
            pieces = spm.SentencePieceProcessor()
            try:
                pieces.Load(str(model))
            except (OSError, RuntimeError) as e:
                raise Phi3Error(f"{model} is not a readable sentencepiece model ({e})") from None
        elif bpe.is_file():  # Phi-4: tokenizer.json's byte-level BPE
            pieces = ByteLevelBPE.from_tokenizer_json(read_json(bpe), str(bpe))
        else:
            raise Phi3Error(f"{model} not found, and no tokenizer.json: expected the sentencepiece model "
                            "of a Phi-3 checkpoint, or the byte-level BPE tokenizer.json of a Phi-4 one")
        config = read_json(folder / "tokenizer_config.json", {})
        for key, kind in (("add_bos_token", bool), ("add_eos_token", bool), ("chat_template", str)):
            if config.get(key) is not None and not isinstance(config[key], kind):
                raise Phi3Error(f"{folder / 'tokenizer_config.json'}: {key} is {config[key]!r:.100}; "
                                f"expected a {kind.__name__}")
        template = folder / "chat_template.jinja"  # where transformers 5's save_pretrained writes it
        tokenizer = cls(pieces, _added_tokens(folder, config), config,
                        template.read_text() if template.is_file() else None)
        tokenizer.files = {name: (folder / name).read_bytes() for name in TOKENIZER_NAMES
                           if (folder / name).is_file()}
        return tokenizer

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the files this tokenizer was read from into `folder` (saving.py).

        They load back with this package and with transformers' AutoTokenizer.
        """
        from .saving import save_tokenizer

        if not self.files:
            raise Phi3Error("Tokenizer.save_pretrained: this tokenizer was not read from a folder "
                            "(Tokenizer.from_pretrained), so there are no files to write")
        save_tokenizer(self.files, folder)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`: added tokens first, sentencepiece on the text between them."""
        if not isinstance(text, str):
            raise Phi3Error(f"encode(text): expected a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: undecodable bytes in a command line or a file
            raise Phi3Error(f"encode(text): the text is not valid Unicode at character {e.start} "
                            f"({text[e.start]!r}: bytes that were not UTF-8?)") from None
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos else []
        pos = 0
        while match := self._added_re.search(text, pos):
            token = self._added[match.group()]
            before = text[pos:match.start()]
            ids += self._encode_text(before.rstrip(WHITESPACE) if token.lstrip else before)
            ids.append(token.id)
            pos = LEADING_WHITESPACE.match(text, match.end()).end() if token.rstrip else match.end()
        ids += self._encode_text(text[pos:])
        return ids + [self.eos_token_id] if add_special_tokens and self.add_eos else ids

    def _encode_text(self, text: str) -> list[int]:
        """The ids of a stretch of text between added tokens."""
        if self._bpe is not None:
            return self._bpe.encode(text)
        return self._sp.encode(text) if text else []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or a 1-D tensor), as tokenizer.json's decoder writes it.

        Ids the tokenizer has no piece for (Phi-3's lm_head has 53 padding rows, 32011-32063, that a
        model can still pick) decode to nothing, as in tokenizers.
        """
        if self._bpe is not None:  # bytes of every token, then UTF-8 (U+FFFD for broken sequences)
            return b"".join(self._token_bytes(i) for i in self._check_ids(ids, "decode(ids)")
                            if not (self._unknown(i) or skip_special_tokens and self._is_special(i))
                            ).decode("utf-8", errors="replace")
        parts, run = [], bytearray()
        for i in self._check_ids(ids, "decode(ids)"):
            if self._unknown(i) or skip_special_tokens and self._is_special(i):
                continue
            if i in self._byte:
                run.append(self._byte[i])
                continue
            if run:
                parts.append(_utf8(run))
                run.clear()
            parts.append(self._text[i])
        text = "".join(parts) + (_utf8(run) if run else "")
        return text[1:] if text.startswith(" ") else text

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder | ByteStreamDecoder:
        return (StreamDecoder if self._bpe is None else ByteStreamDecoder)(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]); encode() it next.

        continue_final_message=True: the text ends inside the last message, with no generation prompt,
        for the model to continue that message (as transformers cuts it: at a marker put after it).
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise Phi3Error(f"apply_chat_template(messages): expected a non-empty list of messages, "
                            f"got {messages!r:.100}")
        for n, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and
                    isinstance(m.get("content"), str)):
                raise Phi3Error(f"apply_chat_template(messages): message {n} is {m!r:.100}; "
                                "expected a dict with a 'role' string and a 'content' string")
        if continue_final_message:
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + CONTINUE_MARK}]
            add_generation_prompt = False
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._names)
        except TemplateError as e:
            raise Phi3Error(f"apply_chat_template(messages): the chat template refused them: {e}") from None
        except Exception as e:  # the template is code from the checkpoint: it can fail in any way
            raise Phi3Error(f"apply_chat_template(messages): the chat template failed: "
                            f"{type(e).__name__}: {e}") from None
        # Phi-3's templates write the roles they have a branch for and skip any other without a word
        # (Phi-3-medium's has no 'system'): say so instead.
        for n, m in enumerate(messages):
            if m["content"].strip() and m["content"].strip() not in text:
                raise Phi3Error(f"apply_chat_template(messages): this checkpoint's chat template "
                                f"left out message {n} (role {m['role']!r}): it writes only the roles "
                                f"it has a branch for; use one of those "
                                f"(a system text can go into the first user message)")
        if continue_final_message:  # cut at the mark; a template that trims the message trims its spaces too
            at = text.rindex(CONTINUE_MARK.strip())
            text = text[:at] if text.startswith(CONTINUE_MARK, at) else text[:at].rstrip()
        return text

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops here: the eos token, <|end|> and <|assistant|> (a model starting a new turn)."""
        ids = ({self._added[c].id for c in ("<|end|>", "<|assistant|>") if c in self._added} |
               {self.eos_token_id})
        return sorted(ids - {None})

    def id_to_piece(self, i: int) -> str:
        """The raw piece of id i ("▁Hello", "<0x0A>", "<|end|>"); "" for an id with no piece."""
        (i,) = self._check_ids([i], "id_to_piece(i)")
        if self._unknown(i):
            return ""
        if i in self._added_by_id:
            return self._added_by_id[i].content
        return self._bpe.piece_of[i] if self._bpe is not None else self._sp.id_to_piece(i)

    def _is_special(self, i: int) -> bool:
        return i in self._added_by_id and self._added_by_id[i].special

    def _named_id(self, key: str, sp_default: int) -> int | None:
        content = self._names.get(key)
        if content is None:
            return sp_default if sp_default >= 0 else None
        if content in self._added:
            return self._added[content].id
        if self._bpe is not None:
            i = self._bpe.vocab.get(content)
        else:
            i = self._sp.piece_to_id(content)
            i = i if self._sp.id_to_piece(i) == content else None
        if i is None:
            raise Phi3Error(f"tokenizer_config.json: {key} is {content!r}; expected an added token "
                            "or a piece of the vocabulary")
        return i

    def _check_ids(self, ids, where: str) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, (int, str)) or not hasattr(ids, "__iter__"):
            raise Phi3Error(f"{where}: expected a list or 1-D tensor of token ids, got {ids!r:.100}")
        checked = []
        for n, i in enumerate(ids):
            i = operator.index(i) if hasattr(i, "__index__") else i  # numpy ints, 0-d tensors
            if not isinstance(i, int) or i < 0:
                raise Phi3Error(f"{where}: element {n} is {i!r:.100}; expected a token id (an integer >= 0)")
            checked.append(i)
        return checked

    def _unknown(self, i: int) -> bool:
        if self._bpe is not None:
            return i not in self._added_by_id and i not in self._bpe.piece_of
        return i >= self.vocab_size or self._text[i] is None

    def _token_bytes(self, i: int) -> bytes:
        """Byte-level BPE: the bytes a token stands for (an added token: its text)."""
        return self._added_by_id[i].content.encode() if i in self._added_by_id else self._bpe.token_bytes(i)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, added={len(self._added)}, "
                f"bos={self.bos_token_id}, eos={self.eos_token_id})")


def _utf8(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:  # tokenizer.json's ByteFallback: one U+FFFD per byte of a broken run
        return "\ufffd" * len(run)


def _raise_exception(message: str):
    raise TemplateError(message)


def _added_tokens(folder: Path, config: dict) -> list[AddedToken]:
    """From tokenizer_config.json's added_tokens_decoder, else added_tokens.json, else tokenizer.json."""
    if "added_tokens_decoder" in config:
        where, raw = "tokenizer_config.json: added_tokens_decoder", config["added_tokens_decoder"]
    elif (folder / "added_tokens.json").is_file():
        where, raw = "added_tokens.json", read_json(folder / "added_tokens.json")
    else:
        where, raw = ("tokenizer.json: added_tokens",
                      read_json(folder / "tokenizer.json", {}).get("added_tokens", []))
    try:
        if where == "added_tokens.json":  # {content: id}, no flags: special, no stripping
            entries = [{"content": content, "id": i} for content, i in raw.items()]
        elif isinstance(raw, dict):  # added_tokens_decoder: {id: {"content": ..., "rstrip": ..., ...}}
            entries = [{**entry, "id": i} for i, entry in raw.items()]
        else:
            entries = raw
        tokens = [AddedToken(int(e["id"]), e["content"], e.get("special", True), e.get("lstrip", False),
                             e.get("rstrip", False)) for e in entries]
    except (TypeError, KeyError, ValueError, AttributeError):
        tokens = None
    if tokens is None or any(not isinstance(t.content, str) or not t.content or t.id < 0 or
                             not all(isinstance(flag, bool) for flag in (t.special, t.lstrip, t.rstrip))
                             for t in tokens):
        raise Phi3Error(f"{folder}/{where} is {raw!r:.300}; expected entries like "
                        '{"content": "<|end|>", "id": 32007, "rstrip": true, "special": true}')
    return tokens
