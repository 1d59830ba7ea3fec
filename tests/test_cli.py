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
    fp32 = json.loads(cli("generate", "--model", tmp_path / "m", "--ids", "1,5,9,200", "--max-new-tokens", 6,
                          "--json", "--kv-cache-dtype", "float32").stdout)
    assert fp32["token_ids"] == want.token_ids  # the same greedy tokens from an fp32 KV cache
    back = cli("convert", tmp_path / "m", tmp_path / "hf", "--to-hf")
    assert (tmp_path / "hf" / "config.json").is_file() and back.returncode == 0


def test_generate_quantised_at_load(tiny_hf, tmp_path):
    """``generate --model M --quantize int8`` serves M's linears as int8: the greedy tokens of the
    engine on the int8 folder converted from the same weights."""
    from internlm_core.engine import open_engine

    cli("convert", tiny_hf[1], tmp_path / "m", "--dtype", "bfloat16")
    cli("convert", tiny_hf[1], tmp_path / "q8", "--dtype", "bfloat16", "--quantize", "int8")
    res = json.loads(cli("generate", "--model", tmp_path / "m", "--ids", "1,5,9,200", "--max-new-tokens", 6,
                         "--quantize", "int8", "--json").stdout)
    want = generate_batch(open_engine(tmp_path / "q8", max_batch=1, max_len=64), [[1, 5, 9, 200]],
                          SamplingParams(max_new_tokens=6))[0]
    assert res["token_ids"] == want.token_ids


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


def test_generate_structured_output(chat_model_dir, tmp_path):
    """--json-schema (text or @FILE) and --choice make the sampled answer match them."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "w": {"type": "string", "maxLength": 6}},
              "required": ["n", "w"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    for given in (json.dumps(schema), f"@{tmp_path / 's.json'}"):
        res = json.loads(cli("generate", "--model", chat_model_dir, "--chat", "JSON please", "--temperature", 1,
                             "--seed", 5, "--max-new-tokens", 60, "--json-schema", given, "--json").stdout)
        jsonschema.validate(json.loads(res["text"]), schema)
    res = json.loads(cli("generate", "--model", chat_model_dir, "Yes or no?", "--temperature", 1, "--seed", 5,
                         "--choice", "yes", "--choice", "no", "--json").stdout)
    assert res["text"] in ("yes", "no") and res["finish_reason"] == "eos"


def test_remote_request_carries_the_grammar():
    from services.cli import build_parser
    from services.cli.remote import generate_request

    args = build_parser().parse_args(["generate", "hi", "--choice", "a", "--choice", "b"])
    assert list(generate_request(args).params.grammar.choice.choices) == ["a", "b"]
    args = build_parser().parse_args(["generate", "hi", "--regex", "[a-z]+"])
    assert generate_request(args).params.grammar.regex == "[a-z]+"
    assert not generate_request(build_parser().parse_args(["generate", "hi"])).params.HasField("grammar")


def test_generate_speculates_locally_as_a_worker_does(chat_model_dir):
    """``--speculate ngram`` gives the plain greedy tokens and reports its proposals; a
    ``--draft-model`` (auto: taken) samples proposals for a seeded request, which repeats exactly
    and keeps most of them (a self-draft); a draft mode without a draft, a draft no mode uses, and
    either option without a local model are refused by name."""
    base = ["generate", "--model", chat_model_dir, "the cat sat on the mat, the cat sat on the", "--max-new-tokens",
            16, "--min-new-tokens", 16, "--json"]
    plain = json.loads(cli(*base).stdout)
    ngram = json.loads(cli(*base, "--speculate", "ngram").stdout)
    assert ngram["token_ids"] == plain["token_ids"] and "speculation" not in plain
    assert ngram["speculation"]["method"] == "ngram" and ngram["speculation"]["steps"] > 0
    sampled = [*base, "--temperature", 0.8, "--seed", 3, "--draft-model", chat_model_dir]
    runs = [json.loads(cli(*sampled).stdout) for _ in range(2)]
    assert runs[0]["token_ids"] == runs[1]["token_ids"] and runs[0]["speculation"]["method"] == "draft"
    assert runs[0]["speculation"]["accepted"] > 0.8 * runs[0]["speculation"]["proposed"] > 0
    for extra, msg in [(["--speculate", "draft"], "--speculate draft needs --draft-model DIR"),
                       (["--speculate", "ngram", "--draft-model", chat_model_dir], "is used by --speculate draft or "
                                                                                   "auto, not ngram")]:
        proc = cli(*base, *extra, check=False)
        assert proc.returncode == 2 and msg in proc.stderr
    for extra, msg in [(["--speculate", "ngram"], "--speculate ngram applies to a local --model"),
                       (["--draft-model", chat_model_dir], "--draft-model applies to a local --model")]:
        proc = cli("generate", "hi", *extra, check=False)
        assert proc.returncode == 2 and msg in proc.stderr


def test_remote_speculate_off_opts_the_request_out():
    from services.cli import build_parser
    from services.cli.remote import generate_request

    def params(*args):
        return generate_request(build_parser().parse_args(["generate", "hi", *args])).params

    assert params("--speculate", "off").speculate is False
    assert not params().HasField("speculate")


@pytest.mark.parametrize("args, msg", [
    (["generate", "--model", "/nonexistent", "hi", "--repetition-penalty", "nan"], "repetition_penalty must be a finite"),
    (["convert", "/nonexistent/hf", "/tmp/x"], "no config.json"),
    (["generate", "--model", "/nonexistent", "hi"], "model folder not found"),
    (["generate", "--model", "/nonexistent"], "either a PROMPT or --ids"),
    (["generate", "--model", "/nonexistent", "hi", "--json-schema", "{no"], "json_schema: not valid JSON"),
])
def test_errors_are_clear(args, msg):
    proc = cli(*args, check=False)
    assert proc.returncode == 2 and msg in proc.stderr


def test_over_long_prompt(tiny_model_dir):
    proc = cli("generate", "--model", tiny_model_dir, "--ids", ",".join(["5"] * 200), check=False)
    assert proc.returncode == 2 and "positions" in proc.stderr


def test_every_parameter_reaches_each_outer_form():
    """Each SamplingParams number and each TrainArgs hyperparameter is a flag of the CLI, and each
    hyperparameter a FinetuneJob field and a flag of `internlm jobs submit finetune`, all derived
    from the dataclasses: a field added there that misses one of these fails here."""
    import argparse
    import dataclasses

    from internlm_core.generation import SCALAR_PARAMS, SamplingParams
    from internlm_core.train_args import HYPERPARAMS
    from services.cli import build_parser
    from services.jobs.checks import JOB_NAMES, TRAIN_FIELDS
    from services.pb import common_pb2, jobs_pb2

    def flags(*path):
        parser = build_parser()
        for name in path:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[name]
        return {a.dest for a in parser._actions}

    assert set(SCALAR_PARAMS) <= flags("generate")
    assert set(SCALAR_PARAMS) <= set(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    numbers = {f.name for f in dataclasses.fields(SamplingParams) if f.type in ("int", "float", "int | None")}
    assert numbers == set(SCALAR_PARAMS)
    assert set(HYPERPARAMS) <= flags("finetune")
    job_names = {JOB_NAMES.get(n, n) for n in HYPERPARAMS}
    assert job_names <= set(jobs_pb2.FinetuneJob.DESCRIPTOR.fields_by_name)
    assert job_names <= flags("jobs", "submit", "finetune")
    assert {TRAIN_FIELDS[n] for n in job_names} == set(HYPERPARAMS)
