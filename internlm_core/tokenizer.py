"""The InternLM tokenizers: a sentencepiece model plus what the HF wrapper adds, and each
family's chat format (``CHAT_FORMATS``): v1's ``<|User|>:...<eoh>`` and InternLM2's ChatML
``<|im_start|>user\n...<|im_end|>``.

A tokenizer is the files of a checkpoint's folder: ``tokenizer.model`` and, where present,
``tokenizer_config.json`` (``added_tokens_decoder``) and ``tokenizer.json`` (``added_tokens``),
which give ids their names. The real InternLM2 / 2.5 model names ids 92538..92543
``[UNUSED_TOKEN_141]``..``[UNUSED_TOKEN_146]``; only its ``tokenizer_config.json`` says they are
``<|plugin|>`` .. ``<|im_start|>``. The family (which chat format) comes from the model's config when
one is at hand, else from the names the tokenizer knows; a tokenizer lacking its family's chat tokens
is refused with the file that should name them.

Text is encoded as plain text by default: a ``<s>`` or ``<eoa>`` typed by a user is those
characters, never the control token, so user text cannot forge the chat format (prompt
injection). ``allow_special=True`` maps the literal special strings to their ids as HF's
``InternLMTokenizer`` and MindFormers do: ``<s>``, ``</s>``, ``<unk>`` (which the raw model would
split into pieces) and the model's user-defined pieces (``<eoh>``, ``<eoa>``, the unused
placeholders), which sentencepiece itself matches anywhere in raw text. The chat template's own
``<eoh>``/``<eoa>`` are always the real ids.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from .checkpoint import TOKENIZER_FILE
from .errors import TokenizerError

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tokenizer.model"

BOS, EOS, UNK = 1, 2, 0
EOH, EOA = 103027, 103028  # single pieces in the real v1 model
CHAT_STOP_IDS = (EOS, EOA)  # v1's, where no tokenizer is at hand to say otherwise
ROLES = ("system", "user", "assistant")


class Control(str):
    """A control piece in a chat format: always its id, never the text a user could type."""


CONTENT = object()  # where a message's content goes in a turn
NAME = object()  # where a message's participant name goes (" name=..."), in formats that have one
# OpenAI's rule for a participant's name; it also keeps the name inside its turn's header line.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ChatFormat:
    """One family's chat template as runs of text, control pieces and the content; ``stops`` are the
    control pieces that end an answer (besides eos). A family with tool calls also has ``tools`` (the
    turn that lists them), ``call`` (one call inside an assistant turn, its JSON as the content) and
    ``environment`` (a tool's result); without them it has none (``None``). ``NAME`` in a turn is
    where a message's participant name goes (ChatML's ``<|im_start|>user name=file``)."""
    system: tuple
    user: tuple
    assistant: tuple
    generation_prompt: tuple
    stops: tuple
    tools: tuple | None = None
    call: tuple | None = None
    environment: tuple | None = None


CHAT_FORMATS = {
    # InternLM v1 (lmdeploy's and MindFormers' research/internlm's): <|System|>:{s}\n, <|User|>:{q}<eoh>\n, <|Bot|>:{a}<eoa>\n
    "internlm": ChatFormat(system=("<|System|>:", CONTENT, "\n"), user=("<|User|>:", CONTENT, Control("<eoh>"), "\n"),
                           assistant=("<|Bot|>:", CONTENT, Control("<eoa>"), "\n"), generation_prompt=("<|Bot|>:",),
                           stops=(Control("<eoa>"),)),
    # InternLM2 / 2.5 (its tokenizer_config's chat_template): ChatML; tool calls as InternLM's
    # chat_format.md gives them: the tools' JSON schemas in a system turn named <|plugin|>, a call
    # <|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|> in the assistant's
    # turn, the result in an environment turn named <|plugin|>.
    # A message's name goes in its header, as chat_format.md's <|im_start|>user name=file.
    "internlm2": ChatFormat(system=(Control("<|im_start|>"), "system", NAME, "\n", CONTENT, Control("<|im_end|>"), "\n"),
                            user=(Control("<|im_start|>"), "user", NAME, "\n", CONTENT, Control("<|im_end|>"), "\n"),
                            assistant=(Control("<|im_start|>"), "assistant", NAME, "\n", CONTENT, Control("<|im_end|>"),
                                       "\n"),
                            generation_prompt=(Control("<|im_start|>"), "assistant\n"),
                            stops=(Control("<|im_end|>"),),
                            tools=(Control("<|im_start|>"), "system name=", Control("<|plugin|>"), "\n", CONTENT,
                                   Control("<|im_end|>"), "\n"),
                            call=(Control("<|action_start|>"), Control("<|plugin|>"), "\n", CONTENT,
                                  Control("<|action_end|>")),
                            environment=(Control("<|im_start|>"), "environment name=", Control("<|plugin|>"), "\n",
                                         CONTENT, Control("<|im_end|>"), "\n")),
}
CHAT_FORMATS["internlm3"] = CHAT_FORMATS["internlm2"]  # InternLM3's tokenizer_config chat_template is the same ChatML

# InternLM3's thinking mode is no token: it is this system prompt, as InternLM publishes it with
# InternLM3-8B-Instruct (the model then writes its reasoning before the answer).
THINKING_SYSTEM_PROMPT = """You are an expert mathematician with extensive experience in mathematical competitions. \
You approach problems through systematic thinking and rigorous reasoning. When solving problems, follow these thought \
processes:
## Deep Understanding
Take time to fully comprehend the problem before attempting a solution. Consider:
- What is the real question being asked?
- What are the given conditions and what do they tell us?
- Are there any special restrictions or assumptions?
- Which information is crucial and which is supplementary?
## Multi-angle Analysis
Before solving, conduct thorough analysis:
- What mathematical concepts and properties are involved?
- Can you recall similar classic problems or solution methods?
- Would diagrams or tables help visualize the problem?
- Are there special cases that need separate consideration?
## Systematic Thinking
Plan your solution path:
- Propose multiple possible approaches
- Analyze the feasibility and merits of each method
- Choose the most appropriate method and explain why
- Break complex problems into smaller, manageable steps
## Rigorous Proof
During the solution process:
- Provide solid justification for each step
- Include detailed proofs for key conclusions
- Pay attention to logical connections
- Be vigilant about potential oversights
## Repeated Verification
After completing your solution:
- Verify your results satisfy all conditions
- Check for overlooked special cases
- Consider if the solution can be optimized or simplified
- Review your reasoning process
Remember:
1. Take time to think thoroughly rather than rushing to an answer
2. Rigorously prove each key conclusion
3. Keep an open mind and try different approaches
4. Summarize valuable problem-solving methods
5. Maintain healthy skepticism and verify multiple times
Your response should reflect deep mathematical understanding and precise logical thinking, making your solution path \
and reasoning clear to others.
When you're ready, present your complete solution with:
- Clear problem understanding
- Detailed solution process
- Key insights
- Thorough verification
Focus on clear, logical progression of ideas and thorough explanation of your mathematical reasoning. Provide answers \
in the same language as the user asking the question, repeat the final answer using a '\\boxed{}' without any units, \
you have [[8192]] tokens to complete the answer.
"""
THINKING_FAMILIES = ("internlm3",)


def thinking_chat(messages: Sequence[dict], family: str) -> list[dict]:
    """``messages`` in thinking mode: InternLM3's published thinking system prompt first. The mode
    is that system prompt, so a chat that brings its own is refused rather than silently changed."""
    if family not in THINKING_FAMILIES:
        raise TokenizerError(f"{family} has no thinking mode (it is InternLM3's: {', '.join(THINKING_FAMILIES)})")
    if any(m.get("role") == "system" for m in messages):
        raise TokenizerError("thinking mode sets the system prompt; this chat has its own system message")
    return [{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *messages]

_SPECIAL = {"<s>": BOS, "</s>": EOS, "<unk>": UNK}
_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED

CONFIG_FILE = "tokenizer_config.json"  # HF: added_tokens_decoder {id: {content, special, ...}}
FAST_FILE = "tokenizer.json"  # HF fast tokenizer: added_tokens [{id, content, special, ...}]
# What makes a checkpoint's tokenizer: copied with the model by conversion, training and export.
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, FAST_FILE, "special_tokens_map.json")
MAX_ADDED_TOKENS = 4096  # more names than any published tokenizer gives; bounds a hostile file
MAX_NAME_CHARS = 256
MAX_FILE_BYTES = 64 << 20  # a tokenizer.json of a large vocabulary is a few MB


@dataclass(frozen=True)
class AddedToken:
    """A name a checkpoint's tokenizer files give an id; ``special`` tokens are left out of text
    decoded with ``skip_special``."""
    content: str
    special: bool = True


def _read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TokenizerError(f"{path}: {path.stat().st_size} bytes, more than a tokenizer file has ({MAX_FILE_BYTES})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def read_added_tokens(folder: str | Path) -> dict[int, AddedToken]:
    """The ids a checkpoint's tokenizer files name: ``tokenizer_config.json``'s
    ``added_tokens_decoder`` and ``tokenizer.json``'s ``added_tokens`` (either may be absent; where
    both name an id they must agree)."""
    folder = Path(folder)
    entries: list[tuple[Path, object, object]] = []  # (file, id, entry)
    if (folder / CONFIG_FILE).is_file():
        path = folder / CONFIG_FILE
        decoder = _read_json(path).get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerError(f"{path}: added_tokens_decoder must be an object of id -> token")
        entries += [(path, i, e) for i, e in decoder.items()]
    if (folder / FAST_FILE).is_file():
        path = folder / FAST_FILE
        added = _read_json(path).get("added_tokens") or []
        if not isinstance(added, list):
            raise TokenizerError(f"{path}: added_tokens must be a list")
        entries += [(path, e.get("id") if isinstance(e, dict) else None, e) for e in added]
    if len(entries) > 2 * MAX_ADDED_TOKENS:
        raise TokenizerError(f"{folder}: {len(entries)} added tokens, more than {MAX_ADDED_TOKENS} per file")
    tokens: dict[int, AddedToken] = {}
    for path, raw_id, entry in entries:
        try:
            i = int(raw_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"{path}: added token id {raw_id!r} is not an integer") from None
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not 0 < len(content) <= MAX_NAME_CHARS:
            raise TokenizerError(f"{path}: added token {i} needs a content of 1..{MAX_NAME_CHARS} characters")
        token = AddedToken(content, bool(entry.get("special", True)))
        if tokens.get(i, token).content != content:
            raise TokenizerError(f"{path}: names id {i} {content!r}, but {CONFIG_FILE} names it {tokens[i].content!r}")
        tokens[i] = token
    return tokens


def _alternation(strings: Iterable[str]) -> re.Pattern:
    """A splitting pattern that keeps the matches; longest first, so no string shadows a longer one."""
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)) + ")")


def _family_of(names) -> str | None:
    """The family whose chat format's control tokens are all among ``names`` (InternLM2's first: a
    vocabulary could hold v1's pieces as well)."""
    for family in ("internlm2", "internlm"):
        if _controls(CHAT_FORMATS[family]) <= set(names):
            return family
    return None


def _controls(fmt: ChatFormat) -> set[str]:
    return {p for turn in (fmt.system, fmt.user, fmt.assistant, fmt.generation_prompt, fmt.stops)
            for p in turn if isinstance(p, Control)}


class Tokenizer:
    def __init__(self, model_file: str | Path | None = None, family: str | None = None,
                 added_tokens: dict[int, AddedToken] | None = None):
        """``model_file`` (or a folder holding it; default: the bundled v1 tokenizer) with the names its folder's
        ``tokenizer_config.json`` / ``tokenizer.json`` give ids (or ``added_tokens``). ``family``
        (internlm | internlm2 | internlm3), from the model's config, picks the chat format; without it the
        names the tokenizer knows say which (InternLM2's has ``<|im_end|>``)."""
        self.model_file = Path(model_file) if model_file else BUNDLED_MODEL
        if self.model_file.is_dir():  # a checkpoint's folder
            self.model_file = self.model_file / TOKENIZER_FILE
        if not self.model_file.is_file():
            raise TokenizerError(f"tokenizer model not found: {self.model_file}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size = self.sp.get_piece_size()
        proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
        # the pieces sentencepiece matches in raw text wherever they occur
        self._user_defined = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _USER_DEFINED}
        self.added_tokens = read_added_tokens(self.model_file.parent) if added_tokens is None else dict(added_tokens)
        outside = sorted(i for i in self.added_tokens if not 0 <= i < self.vocab_size)
        if outside:
            raise TokenizerError(f"{self.model_file.parent / CONFIG_FILE} names id {outside[0]}, outside "
                                 f"{self.model_file.name}'s {self.vocab_size} pieces")
        # name -> id of every token that is not text: <s> </s> <unk>, the user-defined pieces by
        # their piece names, and the names the checkpoint's files give (which win)
        self.special_tokens = {**self._user_defined, **_SPECIAL,
                               **{t.content: i for i, t in self.added_tokens.items()}}
        # id -> the text decode writes for it, and the ids skip_special drops
        self._names = {**{v: k for k, v in _SPECIAL.items()}, **{i: t.content for i, t in self.added_tokens.items()}}
        self._skipped = set(_SPECIAL.values()) | {i for i, t in self.added_tokens.items() if t.special}
        self._user_defined_re = _alternation(self._user_defined) if self._user_defined else None
        self._specials_re = _alternation(self.special_tokens)
        known = family or _family_of(self.special_tokens)
        if known is None:
            raise TokenizerError(f"{self.model_file} is not a tokenizer of a family this project knows: it names "
                                 f"neither <|im_start|>, <|im_end|> (internlm2: in {CONFIG_FILE}'s "
                                 f"added_tokens_decoder or as pieces) nor <eoh>, <eoa> (internlm)")
        if known not in CHAT_FORMATS:
            raise TokenizerError(f"unknown model family {known!r}; known: {', '.join(CHAT_FORMATS)}")
        self.family = known
        self.chat_format = CHAT_FORMATS[known]
        controls = _controls(self.chat_format)
        missing = sorted(p for p in controls if p not in self.special_tokens)
        if missing:
            where = self.model_file.parent / CONFIG_FILE
            said = (f"{where}'s added_tokens_decoder does not name them" if where.is_file()
                    else f"there is no {where} (added_tokens_decoder) to name them")
            raise TokenizerError(f"the {known} chat format needs {', '.join(missing)}, which this tokenizer does not "
                                 f"have: {self.model_file.name} has no such pieces and {said}")
        self.control_ids = {p: self.special_tokens[p] for p in controls}
        # what ends an answer: eos and the format's own end-of-turn token
        self.stop_ids = (EOS, *(self.control_ids[p] for p in self.chat_format.stops))

    @classmethod
    def for_model(cls, folder: str | Path, family: str) -> "Tokenizer":
        """The tokenizer of a model folder (the bundled v1 one where it has none) for its config's family."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file() and family != "internlm":
            raise TokenizerError(f"{folder} has no {TOKENIZER_FILE}: an {family} model needs its own tokenizer "
                                 f"(the bundled one is InternLM v1's)")
        return cls(path if path.is_file() else None, family=family)

    # ---- ids <-> text ------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` as plain text (see the module docstring); with ``allow_special``
        the literal special strings (``<s>``, ``</s>``, ``<unk>``, ``<eoh>``, ``<|im_end|>``, ...) become their ids."""
        ids = [BOS] if bos else []
        ids.extend(self._encode_text(text, allow_special))
        if eos:
            ids.append(EOS)
        return ids

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        ids: list[int] = []
        if allow_special:
            for part in self._specials_re.split(text):
                if part in self.special_tokens:
                    ids.append(self.special_tokens[part])
                elif part:
                    ids.extend(self.sp.encode(part))
            return ids
        if self._user_defined_re is None:
            return self.sp.encode(text)
        for part in self._user_defined_re.split(text):
            if part in self._user_defined:
                # Encoded on their own, its first character and the rest no longer form the piece;
                # the ids decode back to the same text. (A one-character piece, such as InternLM2's
                # full-width letters, is that character's own token either way.)
                ids.extend(self.sp.encode(part[:1]))
                ids.extend(self._encode_text(part[1:], False))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``<s>``, ``</s>``, ``<unk>`` and the ids the checkpoint's files name come
        back as those names (as HF's tokenizer does: 92542 is ``<|im_end|>``, not the model's
        ``[UNUSED_TOKEN_145]``), so ``decode(encode(text))`` is ``text``; ``skip_special`` drops them."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} outside the vocabulary (0..{self.vocab_size - 1})")
        if skip_special:
            # Dropped before decoding, as HF does: byte pieces on both sides of a skipped id still
            # form their character (decoded apart, each side would be U+FFFD).
            ids = [i for i in ids if i not in self._skipped]
        out, run = [], []
        for i in ids:
            if i in self._names:
                out += [self.sp.decode(run), self._names[i]]
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    # ---- chat ----------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    allow_special: bool = False, tools: Sequence[dict] | None = None) -> list[int]:
        """bos + the family's chat format; the template's control pieces are their ids, the
        messages' content is plain text unless ``allow_special``; ``tools``: see ``chat_parts``."""
        ids = [BOS]
        for part in chat_parts(messages, add_generation_prompt, self.chat_format, tools):
            ids.extend([self.control_id(part)] if isinstance(part, Control)
                       else self._encode_text(part, allow_special))
        return ids

    def control_id(self, piece: str) -> int:
        """The id of a control piece of the chat format (the tool-call pieces are looked up when used:
        a tokenizer need not name them to chat)."""
        if piece in self.control_ids:
            return self.control_ids[piece]
        if piece not in self.special_tokens:
            raise TokenizerError(f"this tokenizer does not name {piece}, which tool calls in the {self.family} "
                                 f"chat format need ({CONFIG_FILE}'s added_tokens_decoder names it in InternLM2's)")
        return self.special_tokens[piece]

    def _ids(self, parts) -> list[int]:
        return [i for p in parts for i in ([self.control_ids[p]] if isinstance(p, Control) else self.encode(p, bos=False))]

    def answer_end(self) -> list[int]:
        """What closes an assistant turn after its content (v1: ``<eoa>\n``, v2: ``<|im_end|>\n``)."""
        fmt = self.chat_format
        return self._ids(fmt.assistant[fmt.assistant.index(CONTENT) + 1:])

    def prompt_tail(self) -> list[int]:
        """What follows a user's content in a prompt that asks for an answer (v1: ``<eoh>\n<|Bot|>:``)."""
        fmt = self.chat_format
        return self._ids(fmt.user[fmt.user.index(CONTENT) + 1:] + fmt.generation_prompt)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    tools: Sequence[dict] | None = None) -> str:
        """The chat format as text (control pieces written out), as ``encode_chat`` encodes it."""
        return render_chat(messages, add_generation_prompt, self.chat_format, tools)

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


def chat_parts(messages: Sequence[dict], add_generation_prompt: bool = True,
               fmt: ChatFormat = CHAT_FORMATS["internlm"], tools: Sequence[dict] | None = None) -> list[str]:
    """A chat in ``fmt`` as text runs and its ``Control`` pieces (v1: ``<|System|>:{s}\\n`` then per
    turn ``<|User|>:{q}<eoh>\\n<|Bot|>:{a}<eoa>\\n``, ending with ``<|Bot|>:`` to ask for an answer).
    Adjacent text is one run, so it is tokenized as the whole rendered text would be.

    Tool calls (a family whose format has them): ``tools``, the functions' schemas
    (``{"name", "description", "parameters"}``), are listed as JSON in their own system turn, after
    the leading system message if there is one; an assistant message's ``tool_calls``
    (``{"name", "arguments"}``, the arguments as JSON text) follow its content, each in the format's
    call form; a message of role ``tool`` is a tool's result (its ``tool_call_id`` and ``name`` are not
    part of the format, which pairs results with calls by order and names the environment
    ``<|plugin|>``). A message's ``name`` goes in its turn's header where the format has names."""
    if not messages:
        raise TokenizerError("a chat needs at least one message")
    uses_tools = tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and fmt.call is None:
        raise TokenizerError(f"this model's chat format ({_family_name(fmt)}) has no tool calls: tools, tool "
                             f"calls and tool messages need a model of the InternLM2 family")
    parts: list[str] = [""]

    def add(*items):
        for item in items:
            if not isinstance(item, Control) and not isinstance(parts[-1], Control):
                parts[-1] += item
            else:
                parts.append(item)

    def turn(template, content, name=None):
        for p in template:
            if p is NAME:
                add(f" name={name}" if name else "")
            elif p is not CONTENT:
                add(p)
            elif isinstance(content, str):
                add(content)
            else:  # runs and control pieces (an assistant's content and its calls)
                add(*content)

    def tool_list():
        turn(fmt.tools, json.dumps(list(tools), ensure_ascii=False))

    roles = ROLES + (("tool",) if fmt.call is not None else ())
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in roles:
            raise TokenizerError(f"message {i}: role must be one of {roles}, got {role!r}")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i}: content must be a string")
        if role == "system" and i != 0:
            raise TokenizerError("a system message may only come first")
        if tools and i == 0 and role != "system":
            tool_list()
        name = m.get("name")
        if name is not None and role != "tool":  # a tool's result is named by the format (<|plugin|>)
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
                raise TokenizerError(f"message {i}: name must be 1 to 64 letters, digits, '_' or '-'")
            if NAME not in fmt.user:
                raise TokenizerError(f"message {i}: this model's chat format ({_family_name(fmt)}) has no "
                                     "participant names")
        calls = m.get("tool_calls") or ()
        if calls and role != "assistant":
            raise TokenizerError(f"message {i}: only an assistant message has tool_calls")
        if role == "tool":
            turn(fmt.environment, content)
        elif calls:
            turn(fmt.assistant, [content, *(p for j, c in enumerate(calls)
                                             for p in _call_parts(fmt, c, f"message {i}: tool call {j}"))], name)
        else:
            turn({"system": fmt.system, "user": fmt.user, "assistant": fmt.assistant}[role], content, name)
        if tools and i == 0 and role == "system":
            tool_list()
    if add_generation_prompt:
        if messages[-1]["role"] not in ("user", "tool"):
            raise TokenizerError("the last message must be the user's (or a tool's result) to ask for an answer")
        turn(fmt.generation_prompt, "")
    return [p for p in parts if p != ""]


def call_json(name: str, arguments) -> str:
    """One tool call as InternLM2 writes it: ``{"name": ..., "parameters": {...}}``."""
    return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


def _call_parts(fmt: ChatFormat, call: dict, where: str) -> list:
    name, arguments = call.get("name"), call.get("arguments")
    if not isinstance(name, str) or not name:
        raise TokenizerError(f"{where}: needs a function name")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{where}: arguments are not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise TokenizerError(f"{where}: arguments must be a JSON object, as text")
    return [call_json(name, parsed) if p is CONTENT else p for p in fmt.call]


def _family_name(fmt: ChatFormat) -> str:
    return next((f"{name}: InternLM v1" if name == "internlm" else name)
                for name, f in CHAT_FORMATS.items() if f is fmt)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True,
                fmt: ChatFormat = CHAT_FORMATS["internlm"], tools: Sequence[dict] | None = None) -> str:
    """The chat format as text (control pieces written out), as ``encode_chat`` encodes it."""
    return "".join(chat_parts(messages, add_generation_prompt, fmt, tools))


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
