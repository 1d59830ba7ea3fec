"""The InternLM v1 tokenizer: the real sentencepiece model plus what the HF wrapper adds.

Text is encoded as plain text by default: a ``<s>`` or ``<eoa>`` typed by a user is those
characters, never the control token, so user text cannot forge the chat format (prompt
injection). ``allow_special=True`` maps the literal special strings to their ids as HF's
``InternLMTokenizer`` and MindFormers do: ``<s>``, ``</s>``, ``<unk>`` (which the raw model would
split into pieces) and the model's user-defined pieces (``<eoh>``, ``<eoa>``, the unused
placeholders), which sentencepiece itself matches anywhere in raw text. The chat template's own
``<eoh>``/``<eoa>`` are always the real ids.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from .errors import TokenizerError

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tokenizer.model"

BOS, EOS, UNK = 1, 2, 0
EOH, EOA = 103027, 103028  # single pieces in the real model
CHAT_STOP_IDS = (EOS, EOA)
ROLES = ("system", "user", "assistant")

_SPECIAL = {"<s>": BOS, "</s>": EOS, "<unk>": UNK}
_SPECIAL_TEXT = {v: k for k, v in _SPECIAL.items()}
_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED


def _alternation(strings: Iterable[str]) -> re.Pattern:
    """A splitting pattern that keeps the matches; longest first, so no string shadows a longer one."""
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)) + ")")


class Tokenizer:
    def __init__(self, model_file: str | Path | None = None):
        self.model_file = Path(model_file) if model_file else BUNDLED_MODEL
        if not self.model_file.is_file():
            raise TokenizerError(f"tokenizer model not found: {self.model_file}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size = self.sp.get_piece_size()
        proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
        # the pieces sentencepiece matches in raw text wherever they occur
        self._user_defined = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _USER_DEFINED}
        self._specials = {**self._user_defined, **_SPECIAL}
        self._user_defined_re = _alternation(self._user_defined) if self._user_defined else None
        self._specials_re = _alternation(self._specials)

    # ---- ids <-> text ------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` as plain text (see the module docstring); with ``allow_special``
        the literal special strings (``<s>``, ``</s>``, ``<unk>``, ``<eoh>``, ``<eoa>``, ...) become their ids."""
        ids = [BOS] if bos else []
        ids.extend(self._encode_text(text, allow_special))
        if eos:
            ids.append(EOS)
        return ids

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        ids: list[int] = []
        if allow_special:
            for part in self._specials_re.split(text):
                if part in self._specials:
                    ids.append(self._specials[part])
                elif part:
                    ids.extend(self.sp.encode(part))
            return ids
        if self._user_defined_re is None:
            return self.sp.encode(text)
        for part in self._user_defined_re.split(text):
            if part in self._user_defined:
                # Encoded on their own, its first character and the rest no longer form the piece;
                # the ids decode back to the same text.
                ids.extend(self.sp.encode(part[:1]))
                ids.extend(self._encode_text(part[1:], False))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``<s>``, ``</s>``, ``<unk>`` come back as those literal strings
        (as HF's tokenizer does), so ``decode(encode(text))`` is ``text``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} outside the vocabulary (0..{self.vocab_size - 1})")
        if skip_special:
            # Dropped before decoding, as HF does: byte pieces on both sides of a skipped id still
            # form their character (decoded apart, each side would be U+FFFD).
            return self.sp.decode([i for i in ids if i not in _SPECIAL_TEXT])
        out, run = [], []
        for i in ids:
            if i in _SPECIAL_TEXT:
                out += [self.sp.decode(run), _SPECIAL_TEXT[i]]
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    # ---- chat ----------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    allow_special: bool = False) -> list[int]:
        """bos + the InternLM chat format; the template's ``<eoh>``/``<eoa>`` are control ids, the
        messages' content is plain text unless ``allow_special``."""
        ids = [BOS]
        for part in chat_parts(messages, add_generation_prompt):
            ids.extend([part] if isinstance(part, int) else self._encode_text(part, allow_special))
        return ids

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


def chat_parts(messages: Sequence[dict], add_generation_prompt: bool = True) -> list[str | int]:
    """InternLM v1 chat format as text runs and the template's control ids: ``<|System|>:{s}\\n``
    then per turn ``<|User|>:{q}<eoh>\\n<|Bot|>:{a}<eoa>\\n``; ends with ``<|Bot|>:`` to ask for an
    answer. Adjacent text is one run, so it is tokenized as the whole rendered text would be."""
    if not messages:
        raise TokenizerError("a chat needs at least one message")
    parts: list[str | int] = [""]

    def add(*items):
        for item in items:
            if isinstance(item, str) and isinstance(parts[-1], str):
                parts[-1] += item
            else:
                parts.append(item)

    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TokenizerError(f"message {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i}: content must be a string")
        if role == "system":
            if i != 0:
                raise TokenizerError("a system message may only come first")
            add(f"<|System|>:{content}\n")
        elif role == "user":
            add(f"<|User|>:{content}", EOH, "\n")
        else:
            add(f"<|Bot|>:{content}", EOA, "\n")
    if add_generation_prompt:
        if messages[-1]["role"] != "user":
            raise TokenizerError("the last message must be the user's to ask for an answer")
        add("<|Bot|>:")
    return [p for p in parts if p != ""]


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The chat format as text (``<eoh>``/``<eoa>`` written out), as ``encode_chat`` encodes it."""
    return "".join({EOH: "<eoh>", EOA: "<eoa>"}[p] if isinstance(p, int) else p
                   for p in chat_parts(messages, add_generation_prompt))


class StreamDecoder:
    """Incremental detokenisation for streaming.

    Decodes a sliding window of ids and emits only text that is final: a byte-fallback
    character split over several tokens decodes to U+FFFD until its last byte arrives, so
    text ending in U+FFFD is held back. The concatenated output equals ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tok = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that gives context to the next piece
        self._read = 0  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read], self.skip_special)
        new_text = self.tok.decode(self.ids[self._prefix:], self.skip_special)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete byte sequence at the very end)."""
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read], self.skip_special)
        new_text = self.tok.decode(self.ids[self._prefix:], self.skip_special)
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]
