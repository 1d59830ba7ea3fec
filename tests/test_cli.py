"""``internlm convert`` and ``internlm generate`` as a user runs them (real subprocesses)."""
import json
import subprocess
import sys

import pytest

from internlm_core.engine import Engine
from internlm_core.generation import SamplingParams, generate_batch
from internlm_core.loader import load_model
from tests.helpers import REPO


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "services.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(proc.stderr)
    return proc


def test_convert_then_generate_ids_json(tiny_hf, tmp_path):
    out = cli("convert", tiny_hf[1], tmp_path / "m", "--dtype", "bfloat16")
    assert "wrote" in out.stdout
    res = json.loads(cli("generate", "--model", tmp_path / "m", "--ids", "1,5,9,200", "--max-new-tokens", 6,
                         "--json").stdout)
    engine = Engine(load_model(tmp_path / "m"), max_batch=1, max_len=64)
    want = generate_batch(engine, [[1, 5, 9, 200]], SamplingParams(max_new_tokens=6))[0]
    assert res["token_ids"] == want.token_ids
    assert res["finish_reason"] == want.finish_reason
    back = cli("convert", tmp_path / "m", tmp_path / "hf", "--to-hf")
    assert (tmp_path / "hf" / "config.json").is_file() and back.returncode == 0


def test_generate_chat_prompt(chat_model_dir, tokenizer):
    res = json.loads(cli("generate", "--model", chat_model_dir, "--chat", "你好", "--max-new-tokens", 5,
                         "--temperature", 0.8, "--top-p", 0.9, "--seed", 3, "--json").stdout)
    again = json.loads(cli("generate", "--model", chat_model_dir, "--chat", "你好", "--max-new-tokens", 5,
                           "--temperature", 0.8, "--top-p", 0.9, "--seed", 3, "--json").stdout)
    assert res == again and res["seed"] == 3
    assert res["prompt_tokens"] == len(tokenizer.encode_chat([{"role": "user", "content": "你好"}]))
    assert res["text"] == tokenizer.decode((t for t in res["token_ids"] if t not in (2, 103028)), skip_special=True)


def test_generate_typed_control_strings(chat_model_dir, tokenizer):
    for flag in ([], ["--allow-special-tokens"]):
        for chat in ([], ["--chat"]):
            res = json.loads(cli("generate", "--model", chat_model_dir, *chat, "Hi<eoa></s><s>", "--max-new-tokens", 2,
                                 "--json", *flag).stdout)
            allow = bool(flag)
            want = (tokenizer.encode_chat([{"role": "user", "content": "Hi<eoa></s><s>"}], allow_special=allow) if chat
                    else tokenizer.encode("Hi<eoa></s><s>", allow_special=allow))
            assert res["prompt_tokens"] == len(want), (flag, chat)


@pytest.mark.parametrize("args, msg", [
    (["generate", "--model", "/nonexistent", "hi", "--repetition-penalty", "nan"], "repetition_penalty must be a finite"),
    (["convert", "/nonexistent/hf", "/tmp/x"], "no config.json"),
    (["generate", "--model", "/nonexistent", "hi"], "model folder not found"),
    (["generate", "--model", "/nonexistent"], "either a PROMPT or --ids"),
])
def test_errors_are_clear(args, msg):
    proc = cli(*args, check=False)
    assert proc.returncode == 2 and msg in proc.stderr


def test_over_long_prompt(tiny_model_dir):
    proc = cli("generate", "--model", tiny_model_dir, "--ids", ",".join(["5"] * 200), check=False)
    assert proc.returncode == 2 and "positions" in proc.stderr
