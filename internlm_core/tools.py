"""Tool calls in InternLM2's own format (InternLM's chat_format.md), for any family whose chat format
has them (``ChatFormat.call``; InternLM v1's has none).

A request's ``Tools`` are listed in the prompt (``Tokenizer.encode_chat(..., tools=...)``: a system
turn named ``<|plugin|>``). The model calls one as
``<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`` inside its answer,
possibly several in a row; ``ToolCallParser`` splits the answer's tokens into content and calls as
they come (the name first, then the arguments' text in pieces), so a stream never shows the call's
control pieces or JSON as content.

``tool_choice``: ``auto`` lets the model choose (free generation, parsed); ``none`` leaves the tools
out of the prompt, so the model is not told of them (earlier calls and results in the messages
still render), and the answer is content only; ``required`` or a tool's name constrains the answer
with a grammar (``Tools.grammar``, llguidance through ``structured.py``) to be calls, one or more
(``parallel``), each naming an allowed tool with parameters valid against that tool's schema.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Sequence

from .errors import ToolError
from .structured import JSON_OPTIONS, MAX_GRAMMAR_CHARS, Grammar

MODES = ("auto", "none", "required")  # or a tool's name
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for a function's name
MAX_TOOLS = 128  # OpenAI's bound on a request's functions
FINISH_TOOL_CALLS = "tool_calls"  # an answer that ended after calling tools
# The control pieces of a call, by their names in InternLM2's tokenizer_config.json (ids 92541, 92540, 92538).
ACTION_START, ACTION_END, PLUGIN = "<|action_start|>", "<|action_end|>", "<|plugin|>"
# The start of a call's JSON up to its arguments' value: the name is known once this has come.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:parameters|arguments)"\s*:\s*')
# What may still be the end of the call's object rather than of its arguments: held back while streaming.
_TAIL = re.compile(r"\s*(?:\}\s*)?\Z")


@dataclass(frozen=True)
class Tool:
    """A function the model may call: ``parameters`` is its JSON Schema as JSON text ("" = no parameters)."""
    name: str
    description: str = ""
    parameters: str = ""

    def schema(self) -> dict:
        return json.loads(self.parameters) if self.parameters else {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tools:
    """A request's tools and how the answer may use them: ``choice`` is one of ``MODES`` or a tool's
    name; ``parallel``: the answer may call more than one."""
    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    def validate(self) -> "Tools":
        if not 0 < len(self.tools) <= MAX_TOOLS:
            raise ToolError(f"tools: give 1..{MAX_TOOLS} tools, got {len(self.tools)}")
        seen = set()
        for i, t in enumerate(self.tools):
            if not NAME.fullmatch(t.name):
                raise ToolError(f"tools.{i}: the name {t.name[:80]!r} must be 1..64 letters, digits, _ or -")
            if t.name in seen:
                raise ToolError(f"tools.{i}: the name {t.name!r} is given twice")
            seen.add(t.name)
            try:
                schema = t.schema()
            except json.JSONDecodeError as e:
                raise ToolError(f"tools.{i} ({t.name}): parameters are not JSON ({e})") from None
            if not isinstance(schema, dict):
                raise ToolError(f"tools.{i} ({t.name}): parameters must be a JSON Schema object")
        if self.choice not in MODES and self.choice not in seen:
            raise ToolError(f"tool_choice: no tool is named {self.choice!r}; give one of {', '.join(MODES)} or the "
                            f"name of a tool in tools ({', '.join(sorted(seen))})")
        return self

    def listed(self) -> list[dict] | None:
        """The tools as the prompt lists them (None under ``none``: the model is not told of them)."""
        if self.choice == "none":
            return None
        return [{"name": t.name, "description": t.description, "parameters": t.schema()} for t in self.tools]

    def grammar(self, tokenizer) -> Grammar | None:
        """The grammar that makes the answer calls (``required`` or a named tool; None otherwise): a
        Lark grammar whose control pieces are the tokenizer's ids (llguidance's ``<[id]>``: the
        pieces are special tokens, never text) and whose parameters are each tool's schema."""
        if self.choice in ("auto", "none"):
            return None
        start, end, plugin = (f"<[{tokenizer.control_id(p)}]>" for p in (ACTION_START, ACTION_END, PLUGIN))
        allowed = [t for t in self.tools if self.choice in ("required", t.name)]
        rules = []
        for i, t in enumerate(allowed):
            head = json.dumps('\n{"name": ' + json.dumps(t.name) + ', "parameters": ')
            schema = {**t.schema(), "x-guidance": JSON_OPTIONS}
            rules.append(f"call{i}: {start} {plugin} {head} args{i} \"}}\" {end}\n"
                         f"args{i}: %json {json.dumps(schema)}")
        text = (f"start: call{'+' if self.parallel else ''}\n"
                f"call: {' | '.join(f'call{i}' for i in range(len(allowed)))}\n" + "\n".join(rules))
        if len(text) > MAX_GRAMMAR_CHARS:
            raise ToolError(f"tools: the tools' schemas make a grammar of {len(text)} characters, more than the "
                            f"{MAX_GRAMMAR_CHARS} allowed")
        return Grammar("lark", text)


def prepare(tools: Tools, tokenizer, params, resumed: Sequence[int] = ()):
    """(params, parser) for a request with ``tools``: its sampling params with the tools' grammar
    (``required`` / a named tool), and the parser of its answer (None under ``none``: content only),
    having read the tokens the request already produced (``resumed``)."""
    check_family(tokenizer)
    if (grammar := tools.grammar(tokenizer)) is not None:
        if params.grammar is not None:
            raise ToolError("tool_choice required or a named tool constrains the answer to calls: it cannot be "
                            "combined with a grammar (response_format)")
        params = params.replace(grammar=grammar).validate()
    if tools.choice == "none":
        return params, None
    parser, decoder = ToolCallParser(tokenizer), tokenizer.stream_decoder(skip_special=True)
    parser.split((i, decoder.push(i)) for i in resumed)
    return params, parser


def check_family(tokenizer) -> None:
    """Refuse tools for a model whose chat format has no tool calls (InternLM v1)."""
    if tokenizer.chat_format.call is None:
        raise ToolError(f"tools: this model's chat format ({tokenizer.family}) has no tool calls; tool calls "
                        f"need a model of the InternLM2 or InternLM3 family")


@dataclass
class ToolCallDelta:
    """A piece of the ``index``-th call of an answer: its first piece has the ``id`` and ``name``,
    the ``arguments`` (JSON text) come in pieces whose concatenation is the whole."""
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCallParser:
    """An answer's tokens (id, text) in, content and call pieces out, as they come.

    Text between calls is content. After ``<|action_start|><|plugin|>`` the text is a call: held
    until its name is known, then its arguments are passed on as they come, holding back only what
    may be the call object's closing brace. ``<|action_end|>`` ends the call; another call or more
    content may follow. A call whose text does not start as ``{"name": ..., "parameters": ...`` is
    read as JSON when it ends; text that is no call at all is returned as content (never the control
    pieces). The texts given are the answer's decoded text, which has no control pieces in it."""
    tokenizer: object
    calls: list[ToolCall] = field(default_factory=list)

    def __post_init__(self):
        tok = self.tokenizer
        self.start, self.end, self.plugin = (tok.control_id(p) for p in (ACTION_START, ACTION_END, PLUGIN))
        self.state = "content"  # content | opened (after <|action_start|>) | call (after <|plugin|>)
        self.buf = ""  # the call's text so far
        self.args_at = None  # where its arguments start in buf, once its name is known
        self.sent = 0  # how much of its arguments has been passed on

    def feed(self, token_id: int, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content, call pieces) for one token of the answer and the text it released."""
        if self.state == "content":
            if token_id == self.start:
                self.state = "opened"
            return text, []
        if self.state == "opened":
            if token_id == self.plugin:
                self.state, self.buf, self.args_at, self.sent = "call", "", None, 0
                return text, []
            self.state = "content"  # an action of another kind (the interpreter): not a tool call
            return text, []
        if token_id == self.end:
            self.state = "content"
            content, deltas = self._close(closed=True)
            return content + text, deltas
        self.buf += text
        return "", self._progress()

    def split(self, tokens, end: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """``feed`` over (id, text) pairs, then ``finish`` if the answer ``end``s with them."""
        content, deltas = [], []
        for token_id, text in tokens:
            c, d = self.feed(token_id, text)
            content.append(c)
            deltas += d
        if end:
            c, d = self.finish()
            content.append(c)
            deltas += d
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What is left when the answer ends (a call cut short keeps the arguments it had)."""
        if self.state != "call":
            return "", []
        self.state = "content"
        return self._close(closed=False)

    def _progress(self) -> list[ToolCallDelta]:
        deltas = []
        if self.args_at is None:
            head = _HEAD.match(self.buf)
            if head is None:
                return []
            try:
                name = json.loads(head.group(1))
            except json.JSONDecodeError:  # a bad escape: read whole at the end, or returned as content
                return []
            deltas.append(self._open(name))
            self.args_at = head.end()
        if not self.sent:  # the arguments start at their first character, not at the space before
            self.args_at += len(self.buf[self.args_at:]) - len(self.buf[self.args_at:].lstrip())
        args = self.buf[self.args_at:]
        ready = _TAIL.search(args).start()
        if ready > self.sent:
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=args[self.sent:ready]))
            self.calls[-1].arguments += args[self.sent:ready]
            self.sent = ready
        return deltas

    def _open(self, name: str) -> ToolCallDelta:
        self.calls.append(ToolCall(new_call_id(), name, ""))
        return ToolCallDelta(len(self.calls) - 1, self.calls[-1].id, name)

    def _close(self, closed: bool) -> tuple[str, list[ToolCallDelta]]:
        if self.args_at is not None:
            args = self.buf[self.args_at:]
            end = _TAIL.search(args).start() if closed else len(args)
            rest = args[self.sent:end]
            self.calls[-1].arguments += rest
            return "", [ToolCallDelta(len(self.calls) - 1, arguments=rest)] if rest else []
        try:  # a call written otherwise (the arguments first): read whole
            call = json.loads(self.buf) if closed else None
        except json.JSONDecodeError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            args = call.get("parameters", call.get("arguments", {}))
            delta = self._open(call["name"])
            delta.arguments = self.calls[-1].arguments = json.dumps(args, ensure_ascii=False)
            return "", [delta]
        return self.buf, []  # no call: the model's text, as content


def parse_answer(tokenizer, ids: Sequence[int]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer's ids: the streaming parser over the answer's text as
    generation releases it (stop ids, if any, are left out by the caller)."""
    parser, decoder = ToolCallParser(tokenizer), tokenizer.stream_decoder(skip_special=True)
    texts = [decoder.push(i) for i in ids]
    if texts:
        texts[-1] += decoder.flush()
    return parser.split(zip(ids, texts), end=True)[0], parser.calls
