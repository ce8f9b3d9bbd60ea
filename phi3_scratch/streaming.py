"""Decoding generated ids one at a time: each push(id) returns only the text that id adds.

- StreamDecoder: Phi-3's sentencepiece pieces, byte pieces held until a character is whole.
- ByteStreamDecoder: a byte-level BPE's tokens (Phi-4), bytes held the same way.
- Either way "".join(pushes) + finish() == tokenizer.decode(ids).
"""

from __future__ import annotations

import codecs


class StreamDecoder:
    """Decodes generated ids one at a time: push(id) returns only the text that id adds.

    Byte pieces are held until they make a whole UTF-8 character, and the one leading space that
    decode() drops is dropped here too, so "".join(pushes) == decode(ids) for valid UTF-8. A byte
    run that is not valid UTF-8 gives U+FFFD per byte as soon as it is known to be broken.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._held = 0  # byte pieces of an unfinished character
        self._at_start = True

    def push(self, token_id: int) -> str:
        (i,) = self._tok._check_ids([token_id], "push(token_id)")
        if self._tok._unknown(i) or self._skip and self._tok._is_special(i):
            return ""
        if i in self._tok._byte:
            self._held += 1
            try:
                text = self._utf8.decode(bytes([self._tok._byte[i]]))
            except UnicodeDecodeError:
                text = "\ufffd" * self._held
                self._utf8.reset()
            self._held = 0 if text else self._held
        else:
            text = "\ufffd" * self._held + self._tok._text[i]
            self._utf8.reset()
            self._held = 0
        if self._at_start and text:
            self._at_start = False
            text = text[1:] if text.startswith(" ") else text
        return text

    def finish(self) -> str:
        """Call when generation ends: the bytes of a character left unfinished, as U+FFFD each."""
        text, self._held = "\ufffd" * self._held, 0
        self._utf8.reset()
        return text


class ByteStreamDecoder:
    """StreamDecoder for a byte-level BPE: push(id) returns the text its bytes complete, so
    "".join(pushes) + finish() == decode(ids)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        (i,) = self._tok._check_ids([token_id], "push(token_id)")
        if self._tok._unknown(i) or self._skip and self._tok._is_special(i):
            return ""
        return self._utf8.decode(self._tok._token_bytes(i))

    def finish(self) -> str:
        """Call when generation ends: a character left unfinished, as U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
