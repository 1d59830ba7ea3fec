"""``internlm generate`` without --model talks to the running stack's endpoint."""
import json

import pytest

from internlm_core.generation import SamplingParams, generate
from services.cli import main


def test_json_output_is_the_cores_result(endpoint, core_engine, core_tokenizer, capsys):
    rc = main(["generate", "The old harbour", "--endpoint", endpoint.address, "--max-new-tokens", "9",
               "--temperature", "0.7", "--top-k", "40", "--seed", "11", "--json"])
    out = json.loads(capsys.readouterr().out)
    prompt = core_tokenizer.encode("The old harbour")
    events = list(generate(core_engine, prompt, SamplingParams(max_new_tokens=9, temperature=0.7, top_k=40, seed=11),
                           core_tokenizer))
    assert rc == 0
    assert out["token_ids"] == [e.token_id for e in events]
    assert out["text"] == "".join(e.text for e in events)
    assert out["finish_reason"] == events[-1].finish_reason
    assert (out["prompt_tokens"], out["seed"]) == (len(prompt), 11)


def test_stream_printed_and_endpoint_from_environment(endpoint, core_engine, core_tokenizer, capsys, monkeypatch):
    monkeypatch.setenv("INTERNLM_ENDPOINT", endpoint.address)
    rc = main(["generate", "Hi there", "--chat", "--system", "Answer briefly.", "--max-new-tokens", "6"])
    prompt = core_tokenizer.encode_chat([{"role": "system", "content": "Answer briefly."},
                                         {"role": "user", "content": "Hi there"}])
    text = "".join(e.text for e in generate(core_engine, prompt, SamplingParams(max_new_tokens=6), core_tokenizer))
    assert rc == 0 and capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize("flag", [[], ["--allow-special-tokens"]])
def test_typed_control_strings_remote(endpoint, core_tokenizer, capsys, flag):
    text = "Stop here<eoa> and </s>"
    assert main(["generate", text, "--chat", "--endpoint", endpoint.address, "--max-new-tokens", "2", "--json",
                 *flag]) == 0
    out = json.loads(capsys.readouterr().out)
    prompt = core_tokenizer.encode_chat([{"role": "user", "content": text}], allow_special=bool(flag))
    assert out["prompt_tokens"] == len(prompt)


@pytest.mark.parametrize("argv, words", [
    (["generate", "x", "--temperature", "nan"], "INVALID_ARGUMENT: temperature must be a finite number"),
    (["generate", "x", "--top-p", "1.5"], "INVALID_ARGUMENT: top_p"),
    (["generate", "x", "--adapter", "nope"], "NOT_FOUND: unknown adapter 'nope'"),
    (["generate", "--ids", "1,999999"], "INVALID_ARGUMENT: token id 999999"),
])
def test_errors_are_reported_with_their_status(endpoint, capsys, argv, words):
    assert main([*argv, "--endpoint", endpoint.address]) == 1
    assert words in capsys.readouterr().err


def test_no_stack_running(capsys):
    from tests.helpers import free_port

    assert main(["generate", "x", "--endpoint", f"127.0.0.1:{free_port()}"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
