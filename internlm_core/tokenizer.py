"""The InternLM v1 tokenizer: the real sentencepiece model plus what the HF wrapper adds.

The raw sentencepiece model splits the literal text ``<s>`` into pieces, so the special
strings are mapped to their ids here, as HF's ``InternLMTokenizer`` and MindFormers do.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tokenizer.model"

BOS, EOS, UNK = 1, 2, 0
EOH, EOA = 103027, 103028  # single pieces in the real model
CHAT_STOP_IDS = (EOS, EOA)
ROLES = ("system", "user", "assistant")

_SPECIAL = {"<s>": BOS, "</s>": EOS, "<unk>": UNK}
_SPECIAL_TEXT = {v: k for k, v in _SPECIAL.items()}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in _SPECIAL) + ")")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, model_file: str | Path | None = None):
        self.model_file = Path(model_file) if model_file else BUNDLED_MODEL
        if not self.model_file.is_file():
            raise TokenizerError(f"tokenizer model not found: {self.model_file}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size = self.sp.get_piece_size()

    # ---- ids <-> text ------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``; literal ``<s>``, ``</s>``, ``<unk>`` become their ids."""
        ids = [BOS] if bos else []
        for part in _SPECIAL_RE.split(text):
            if part in _SPECIAL:
                ids.append(_SPECIAL[part])
            elif part:
                ids.extend(self.sp.encode(part))
        if eos:
            ids.append(EOS)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``<s>``, ``</s>``, ``<unk>`` come back as those literal strings
        (as HF's tokenizer does), so ``decode(encode(text))`` is ``text``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} outside the vocabulary (0..{self.vocab_size - 1})")
        out, run = [], []
        for i in ids:
            if i in _SPECIAL_TEXT:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(_SPECIAL_TEXT[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # ---- chat ----------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        return [BOS] + self.encode(render_chat(messages, add_generation_prompt), bos=False)

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """InternLM v1 chat format: ``<|System|>:{s}\\n`` then per turn
    ``<|User|>:{q}<eoh>\\n<|Bot|>:{a}<eoa>\\n``; ends with ``<|Bot|>:`` to ask for an answer."""
    if not messages:
        raise TokenizerError("a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TokenizerError(f"message {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i}: content must be a string")
        if role == "system":
            if i != 0:
                raise TokenizerError("a system message may only come first")
            out.append(f"<|System|>:{content}\n")
        elif role == "user":
            out.append(f"<|User|>:{content}<eoh>\n")
        else:
            out.append(f"<|Bot|>:{content}<eoa>\n")
    if add_generation_prompt:
        if messages[-1]["role"] != "user":
            raise TokenizerError("the last message must be the user's to ask for an answer")
        out.append("<|Bot|>:")
    return "".join(out)


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
