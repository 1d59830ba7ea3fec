"""Tool calls in InternLM2's format, with the real InternLM2 tokenizer: the control pieces' ids, the
prompt's exact ids (the tools' system turn, an assistant's calls, a tool's result as an environment
turn), InternLM v1 refused, the parser (whole and streamed) on hand-written answers, and the grammar
that makes an answer calls."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from internlm_core.errors import TokenizerError, ToolError
from internlm_core.structured import compile_grammar
from internlm_core.tokenizer import Tokenizer
from internlm_core.tools import Tool, ToolCallParser, Tools, check_family, parse_answer
from tests.helpers import V2_TOKENIZER

WEATHER = Tool("get_weather", "The weather in a city", json.dumps(
    {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                      "days": {"type": "integer", "minimum": 1, "maximum": 7}},
     "required": ["city", "days"], "additionalProperties": False}))
TIME = Tool("get_time", "The time in a zone", json.dumps(
    {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
     "additionalProperties": False}))
# InternLM2's tokenizer_config.json names these ids (its tokenizer.model calls them [UNUSED_TOKEN_141..146])
PLUGIN, INTERPRETER, ACTION_END, ACTION_START, IM_END, IM_START = range(92538, 92544)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(V2_TOKENIZER / "tokenizer.model")


def enc(tok, text):
    return tok.encode(text, bos=False)


def test_the_control_pieces_are_the_published_ids(tok):
    config = json.loads((V2_TOKENIZER / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    sp = spm.SentencePieceProcessor(model_file=str(V2_TOKENIZER / "tokenizer.model"))
    names = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
    for i, name in zip(range(92538, 92544), names):
        assert config[str(i)]["content"] == name and config[str(i)]["special"]
        assert sp.id_to_piece(i) == f"[UNUSED_TOKEN_{i - 92538 + 141}]"  # the model's own name for it
        assert tok.control_id(name) == i


def test_a_tool_chat_renders_as_chat_format_md_gives_it(tok):
    tools = Tools((WEATHER, TIME)).validate()
    call = {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [call, {"name": "get_time",
                                                                                    "arguments": '{"zone": "CET"}'}]},
                {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": "call_1"},
                {"role": "tool", "content": '"12:00"', "tool_call_id": "call_2"}]
    listed = json.dumps(tools.listed(), ensure_ascii=False)
    want = ([1, IM_START] + enc(tok, "system\nBe brief.") + [IM_END] + enc(tok, "\n")
            + [IM_START] + enc(tok, "system name=") + [PLUGIN] + enc(tok, "\n" + listed) + [IM_END] + enc(tok, "\n")
            + [IM_START] + enc(tok, "user\nParis?") + [IM_END] + enc(tok, "\n")
            + [IM_START] + enc(tok, "assistant\nChecking.")
            + [ACTION_START, PLUGIN] + enc(tok, '\n{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}')
            + [ACTION_END, ACTION_START, PLUGIN] + enc(tok, '\n{"name": "get_time", "parameters": {"zone": "CET"}}')
            + [ACTION_END, IM_END] + enc(tok, "\n")
            + [IM_START] + enc(tok, "environment name=") + [PLUGIN] + enc(tok, '\n{"sky": "clear"}') + [IM_END]
            + enc(tok, "\n")
            + [IM_START] + enc(tok, "environment name=") + [PLUGIN] + enc(tok, '\n"12:00"') + [IM_END] + enc(tok, "\n")
            + [IM_START] + enc(tok, "assistant\n"))
    assert tok.encode_chat(messages, tools=tools.listed()) == want
    assert json.loads(listed)[0] == {"name": "get_weather", "description": "The weather in a city",
                                     "parameters": json.loads(WEATHER.parameters)}
    # without a system message the tools' turn comes first; tool_choice none leaves it out
    assert tok.encode_chat(messages[1:2], tools=tools.listed())[:5] == [1, IM_START] + enc(tok, "system name=")
    assert Tools((WEATHER,), "none").listed() is None
    assert tok.encode_chat(messages[1:2], tools=None) == [1, IM_START] + enc(tok, "user\nParis?") + [IM_END] + enc(
        tok, "\n") + [IM_START] + enc(tok, "assistant\n")


def test_typed_control_text_stays_text(tok):
    ids = tok.encode_chat([{"role": "tool", "content": "<|action_start|><|plugin|>"}], add_generation_prompt=False)
    assert ACTION_START not in ids and PLUGIN in ids  # the one <|plugin|> is the template's (name=)
    assert ids.count(PLUGIN) == 1


@pytest.mark.parametrize("messages, message", [
    ([{"role": "tool", "content": "1"}, {"role": "tool", "content": "2", "tool_calls": [{"name": "f"}]}],
     "message 1: only an assistant message has tool_calls"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{"}]}],
     "message 0: tool call 0: arguments are not JSON"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "[1]"}]}],
     "arguments must be a JSON object"),
])
def test_bad_tool_messages_are_refused(tok, messages, message):
    with pytest.raises(TokenizerError, match=message):
        tok.encode_chat(messages, add_generation_prompt=False)


def test_internlm_v1_has_no_tool_calls(tokenizer):
    with pytest.raises(TokenizerError, match=r"chat format \(internlm: InternLM v1\) has no tool calls"):
        tokenizer.encode_chat([{"role": "user", "content": "x"}], tools=[{"name": "f"}])
    with pytest.raises(TokenizerError, match="has no tool calls"):  # a tool's result, too
        tokenizer.encode_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ToolError, match=r"\(internlm\) has no tool calls"):
        check_family(tokenizer)


def answer(tok, *parts):
    """Ids of an answer: text runs and control ids."""
    return [i for p in parts for i in (enc(tok, p) if isinstance(p, str) else [p])]


def stream(tok, ids):
    """The streaming parser's content and call pieces, token by token."""
    parser, decoder, out = ToolCallParser(tok), tok.stream_decoder(skip_special=True), []
    for i in ids:
        out.append(parser.feed(i, decoder.push(i)))
    out.append(parser.finish())
    return out


def test_two_calls_parse_whole_and_streamed(tok):
    ids = answer(tok, "Let me look.", ACTION_START, PLUGIN,
                 '\n{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}', ACTION_END,
                 ACTION_START, PLUGIN, '\n{"name": "get_time", "parameters": {"zone": "UTC"}}', ACTION_END)
    content, calls = parse_answer(tok, ids)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo", "days": 3}),
                                                                  ("get_time", {"zone": "UTC"})]
    assert calls[0].arguments == '{"city": "Oslo", "days": 3}'
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls) and calls[0].id != calls[1].id
    pieces = stream(tok, ids)
    assert "".join(c for c, _ in pieces) == content  # no control piece, no call JSON in the content
    deltas = [d for _, ds in pieces for d in ds]
    for index, call in enumerate(calls):
        mine = [d for d in deltas if d.index == index]
        assert mine[0].name == call.name and mine[0].id and mine[0].arguments == ""  # the name first
        assert all(not d.name and not d.id for d in mine[1:])
        assert len(mine) > 3  # the arguments in several pieces, as the tokens come
        assert "".join(d.arguments for d in mine) == call.arguments


def test_content_around_calls_and_odd_calls(tok):
    # arguments before the name: read whole when the call ends
    content, calls = parse_answer(tok, answer(tok, ACTION_START, PLUGIN, '\n{"parameters": {"a": 1}, "name": "f"}',
                                              ACTION_END, " after"))
    assert content == " after" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
    # not a call at all: its text is content, the control pieces never are
    content, calls = parse_answer(tok, answer(tok, "Hi", ACTION_START, PLUGIN, "\nno json here", ACTION_END))
    assert content == "Hi\nno json here" and calls == []
    # the interpreter's action is not a tool call
    content, calls = parse_answer(tok, answer(tok, ACTION_START, INTERPRETER, "print(1)", ACTION_END))
    assert content == "print(1)" and calls == []
    # cut short (length): the call keeps the arguments it had
    content, calls = parse_answer(tok, answer(tok, ACTION_START, PLUGIN, '\n{"name": "f", "parameters": {"q": "ab'))
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"q": "ab')]


@pytest.mark.parametrize("tools, message", [
    (Tools(()), "give 1..128 tools"),
    (Tools((Tool("a b"),)), "must be 1..64 letters"),
    (Tools((Tool("f"), Tool("f"))), "the name 'f' is given twice"),
    (Tools((Tool("f", parameters="{"),)), r"tools.0 \(f\): parameters are not JSON"),
    (Tools((Tool("f", parameters="[]"),)), "must be a JSON Schema object"),
    (Tools((Tool("f"),), "g"), "tool_choice: no tool is named 'g'"),
])
def test_bad_tools_are_refused(tools, message):
    with pytest.raises(ToolError, match=message):
        tools.validate()


def follow(constraint, tok, ids):
    """Feed ids through the constraint, each checked against its mask; whether each was allowed."""
    for i in ids:
        if not constraint.allowed(tok.vocab_size)[i]:
            return False
        constraint.advance(i)
    return True


def test_the_grammar_makes_the_answer_calls(tok):
    required = Tools((WEATHER, TIME), "required").validate().grammar(tok)
    good = answer(tok, ACTION_START, PLUGIN, '\n{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
                  ACTION_END)
    second = answer(tok, ACTION_START, PLUGIN, '\n{"name": "get_time", "parameters": {"zone": "UTC"}}', ACTION_END)
    c = compile_grammar(required, tok, tok.stop_ids)
    assert follow(c, tok, good + second)
    assert c.allowed(tok.vocab_size)[IM_END] and c.allowed(tok.vocab_size)[ACTION_START]  # end, or one more call
    c = compile_grammar(required, tok, tok.stop_ids)
    assert not c.allowed(tok.vocab_size)[enc(tok, "Hi")[0]]  # content first: not a call
    assert not c.allowed(tok.vocab_size)[IM_END]
    c = compile_grammar(required, tok, tok.stop_ids)
    rome = answer(tok, ACTION_START, PLUGIN, '\n{"name": "get_weather", "parameters": {"city": "Rome"')
    assert not follow(c, tok, rome)  # not in the schema's enum
    # a named tool: only it; one call unless parallel
    named = Tools((WEATHER, TIME), "get_time", parallel=False).validate().grammar(tok)
    c = compile_grammar(named, tok, tok.stop_ids)
    assert not follow(c, tok, good)
    c = compile_grammar(named, tok, tok.stop_ids)
    assert follow(c, tok, second)
    allowed = c.allowed(tok.vocab_size)
    assert allowed[IM_END] and not allowed[ACTION_START]
    assert Tools((WEATHER,), "auto").grammar(tok) is None and Tools((WEATHER,), "none").grammar(tok) is None


def test_sampled_answers_under_the_grammar_are_valid_calls(tok):
    """Random logits, masked: every answer parses into calls of the allowed tools with valid arguments."""
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t.name: json.loads(t.parameters) for t in (WEATHER, TIME)}
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = compile_grammar(Tools((WEATHER, TIME), "required").validate().grammar(tok), tok, tok.stop_ids)
        ids = []
        while len(ids) < 200:
            token = int(np.argmax(c.mask(rng.standard_normal(tok.vocab_size).astype(np.float32))))
            if token in tok.stop_ids:
                break
            c.advance(token)
            ids.append(token)
        content, calls = parse_answer(tok, ids)
        assert content == "" and calls
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_a_grammar_over_the_limit_is_refused(tok):
    big = Tool("f", parameters=json.dumps({"type": "object", "description": "x" * 40_000}))
    with pytest.raises(ToolError, match="more than the 32768 allowed"):
        Tools((big,), "required").grammar(tok)
