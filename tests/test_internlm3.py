"""InternLM3 (model_type internlm3): a tiny random model built as HF's LlamaForCausalLM with 8 query
heads on 2 k/v heads, head_dim given explicitly (16, not hidden / heads = 12), q/k/v biases without
an o or MLP bias, and dynamic NTK at factor 6; saved as an InternLM3 HF folder by the test and
converted by the project: logits, greedy generations past the trained positions on both attention
paths, the way back bit for bit, LoRA on every linear, exported graphs, the chat format with the
checkpoint's own ids, thinking mode, and the CLI."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from internlm_core.config import Config
from internlm_core.convert import hf_to_ms, ms_to_hf
from internlm_core.engine import Engine
from internlm_core.errors import CheckpointError
from internlm_core.generation import SamplingParams, generate
from internlm_core.loader import load_model
from internlm_core.model import forward_inputs
from tests.helpers import (REPO, hf_greedy, hf_logits, hf_reference_model, random_ids, save_internlm3_folder,
                           v3_tokenizer_folder)

CFG = Config.from_name("tiny-v3")
BIAS_CASES = {"qkv-bias": {}, "no-bias": dict(bias=False, o_bias=None), "all-bias": dict(o_bias=None, mlp_bias=True)}


@pytest.fixture(scope="module")
def ref():
    return hf_reference_model(CFG, seed=11)


@pytest.fixture(scope="module")
def v3_dir(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("v3")
    hf_to_ms(save_internlm3_folder(ref, CFG, root / "hf"), root / "ms")
    return root / "ms"



@pytest.mark.parametrize("case", BIAS_CASES)
def test_the_converted_model_is_hfs_network_with_either_bias_switch(case, tmp_path):
    """Logits equal HF's at 1e-4 with qkv_bias alone, no bias, and both switches on; the o / MLP
    biases exist exactly where the config's ``bias`` says."""
    cfg = CFG.replace(**BIAS_CASES[case])
    ref = hf_reference_model(cfg, seed=3)
    hf = save_internlm3_folder(ref, cfg, tmp_path / "hf")
    got = hf_to_ms(hf, tmp_path / "ms")
    assert (got.family, got.num_heads, got.kv_heads, got.head_dim) == ("internlm3", 8, 2, 16)
    assert (got.bias, got.out_bias, got.mlp_bias) == (cfg.bias, cfg.out_bias, cfg.mlp_bias)
    model = load_model(tmp_path / "ms")
    ids = random_ids(40, cfg.vocab_size, seed=2)
    ours = model(*forward_inputs(got, np.array([ids]))).asnumpy()[0]
    np.testing.assert_allclose(ours, hf_logits(ref, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["kernels", "mindspore-ops"])
def test_greedy_past_the_trained_positions_equals_hf(ref, v3_dir, cpu_kernels):
    """Cached decoding with 4 query heads per k/v head and head_dim 16, prompts and generations past
    the 64 trained positions (dynamic NTK at factor 6): HF's cached greedy tokens on both paths."""
    engine = Engine(load_model(v3_dir), max_batch=2, max_len=160, cpu_kernels=cpu_kernels, cache_dtype="float32")
    assert engine.kernels == cpu_kernels
    assert engine.cache_bytes_per_slot == 2 * CFG.num_layers * 160 * CFG.kv_heads * 16 * 4
    params = SamplingParams(max_new_tokens=40, stop_token_ids=[], ignore_eos=True)
    for n in (12, 90):
        prompt = random_ids(n, CFG.vocab_size, seed=n)
        assert [e.token_id for e in generate(engine, prompt, params)] == hf_greedy(ref, prompt, 40), f"prompt of {n}"


def test_the_way_back_is_bit_exact(v3_dir, tmp_path):
    from safetensors.numpy import load_file

    back = tmp_path / "back"
    ms_to_hf(v3_dir, back)
    original = load_file(str(v3_dir.parent / "hf" / "model.safetensors"))
    again = load_file(str(back / "model.safetensors"))
    assert set(original) == set(again) and "model.layers.0.self_attn.q_proj.bias" in again
    assert "model.layers.0.self_attn.o_proj.bias" not in again
    for name, value in original.items():
        assert again[name].dtype == value.dtype and np.array_equal(again[name], value), name
    hf = json.loads((back / "config.json").read_text())
    assert (hf["model_type"], hf["architectures"], hf["head_dim"], hf["num_key_value_heads"]) == (
        "internlm3", ["InternLM3ForCausalLM"], 16, 2)
    assert (hf["qkv_bias"], hf["bias"]) == (True, False)
    assert hf["rope_scaling"] == {"rope_type": "dynamic", "factor": 6.0} and hf["rope_theta"] == 5e7


def test_what_does_not_fit_is_refused_naming_the_tensor(v3_dir, tmp_path):
    hf = v3_dir.parent / "hf"
    config = json.loads((hf / "config.json").read_text())
    (tmp_path / "hf").mkdir()
    shutil.copyfile(hf / "model.safetensors", tmp_path / "hf" / "model.safetensors")  # (a link out is refused)
    for change, msg in [({"head_dim": 12}, r"self_attn\.[qkv]_proj\.(weight|bias): shape \[(128|32)(, 96)?\] does not "
                                           r"match the config's \[(96|24)(, 96)?\]"),
                        ({"num_key_value_heads": 4}, r"self_attn\.[kv]_proj\.(weight|bias): shape \[32(, 96)?\] does not "
                                                     r"match the config's \[64(, 96)?\]"),
                        ({"qkv_bias": False}, "unexpected tensor.*q_proj.bias"),
                        ({"bias": True}, "missing tensor.*o_proj.bias|missing tensor.*attention.wo.bias")]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=msg):
            hf_to_ms(tmp_path / "hf", tmp_path / "ms")
        assert not (tmp_path / "ms").exists()


def test_a_served_adapter_on_every_linear_equals_the_merged_model(v3_dir, tmp_path):
    """LoRA on all seven linears, q and o nh * hd = 128 wide against a hidden size of 96."""
    from internlm_core.lora import ALL_TARGETS, AdapterSpec, merge_lora
    from tests.helpers import random_adapter

    adapter = random_adapter(CFG, AdapterSpec(rank=4, alpha=8.0, targets=ALL_TARGETS), tmp_path / "ad", seed=6)
    merged = merge_lora(v3_dir, adapter, tmp_path / "merged")
    served = Engine(load_model(v3_dir), max_batch=2, max_len=128, cache_dtype="float32")
    index = served.load_adapter("a", adapter)
    reference = Engine(load_model(merged), max_batch=1, max_len=128, cache_dtype="float32")
    prompt = random_ids(30, CFG.vocab_size, seed=8)
    np.testing.assert_allclose(served.prefill([0], [prompt], adapters=[index])[0], reference.prefill([0], [prompt])[0],
                               atol=1e-4)


def test_a_lora_fine_tune_runs_and_the_exported_graphs_decode_as_the_eager_engine(v3_dir, tmp_path):
    from internlm_core.export import export_mindir
    from internlm_core.exported import ExportedEngine
    from internlm_core.train import Trainer
    from internlm_core.train_args import TrainArgs

    rows = np.asarray([random_ids(33, CFG.vocab_size, seed=s) for s in range(4)], np.int32)
    from internlm_core.data import write_dataset

    write_dataset(tmp_path / "ds", [{"input_ids": r, "labels": r} for r in rows], "wikitext", {})
    args = TrainArgs(model=str(v3_dir), data=str(tmp_path / "ds"), out=str(tmp_path / "adapter"), mode="lora",
                     max_steps=3, batch_size=2, lr=1e-2, save_every=0, seed=1, lora_targets="wq,wk,wv,wo,w1,w2,w3")
    history = Trainer(args, tmp_path / "work").fit()
    assert len(history) == 3 and all(np.isfinite(r["loss"]) for r in history)

    folder = export_mindir(v3_dir, tmp_path / "mindir", max_batch=1, max_len=96)
    params = SamplingParams(max_new_tokens=20, stop_token_ids=[], ignore_eos=True)
    prompt = random_ids(70, CFG.vocab_size, seed=9)  # past the 64 trained positions: dynamic NTK
    exported = [e.token_id for e in generate(ExportedEngine(folder), prompt, params)]
    eager = [e.token_id for e in generate(Engine(load_model(v3_dir), max_batch=1, max_len=96), prompt, params)]
    assert exported == eager


# ---- the tokenizer and chat format: names from the checkpoint's own files ----------------------

@pytest.fixture(scope="module")
def v3_tokenizer(tmp_path_factory):
    return v3_tokenizer_folder(tmp_path_factory.mktemp("v3tok"), CFG.vocab_size)


def test_the_chat_format_is_chatml_with_the_checkpoints_own_ids(v3_tokenizer):
    from internlm_core.tokenizer import BOS, EOS, Tokenizer

    tok = Tokenizer.for_model(v3_tokenizer, "internlm3")
    start, end = (tok.sp.piece_to_id(f"[UNUSED_TOKEN_{i}]") for i in (0, 1))
    assert tok.family == "internlm3" and tok.stop_ids == (EOS, end)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The river"}]
    assert tok.render_chat(chat) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nThe river<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    text = lambda s: tok.encode(s, bos=False)  # noqa: E731
    assert tok.encode_chat(chat) == ([BOS, start] + text("system\nBe brief.") + [end] + text("\n") + [start]
                                     + text("user\nThe river") + [end] + text("\n") + [start] + text("assistant\n"))
    assert tok.decode([start, *text("user"), end], skip_special=False) == "<|im_start|>user<|im_end|>"


def test_tool_calls_use_internlm2s_format_with_the_checkpoints_own_ids(v3_tokenizer):
    """InternLM3 calls tools as InternLM2 does: the tools' <|plugin|> system turn, a call between
    <|action_start|><|plugin|> and <|action_end|>, with the ids its own tokenizer_config.json names."""
    from internlm_core.tokenizer import BOS, Tokenizer
    from internlm_core.tools import parse_answer

    tok = Tokenizer.for_model(v3_tokenizer, "internlm3")
    ids = {name: tok.special_tokens[name] for name in ("<|im_start|>", "<|im_end|>", "<|plugin|>", "<|action_start|>",
                                                        "<|action_end|>")}
    text = lambda s: tok.encode(s, bos=False)  # noqa: E731
    tools = [{"name": "weather", "parameters": {"type": "object"}}]
    prompt = tok.encode_chat([{"role": "user", "content": "Rain?"}], tools=tools)
    head = [BOS, ids["<|im_start|>"], *text("system name="), ids["<|plugin|>"]]
    assert prompt[:len(head)] == head
    answer = ([*text("Checking."), ids["<|action_start|>"], ids["<|plugin|>"]] + text('\n{"name": "weather", "parameters": '
                                                                              '{"city": "Oslo"}}')
              + [ids["<|action_end|>"]])
    content, calls = parse_answer(tok, answer)
    assert content == "Checking." and [(c.name, json.loads(c.arguments)) for c in calls] == [("weather", {"city": "Oslo"})]


def test_thinking_mode_is_internlm3s_published_system_prompt(v3_tokenizer):
    from internlm_core.errors import TokenizerError
    from internlm_core.tokenizer import THINKING_SYSTEM_PROMPT, Tokenizer, thinking_chat

    tok = Tokenizer.for_model(v3_tokenizer, "internlm3")
    chat = [{"role": "user", "content": "1 + 1?"}]
    thinking = thinking_chat(chat, tok.family)
    assert thinking == [{"role": "system", "content": THINKING_SYSTEM_PROMPT}] + chat
    assert THINKING_SYSTEM_PROMPT.startswith("You are an expert mathematician with extensive experience")
    assert "you have [[8192]] tokens to complete the answer." in THINKING_SYSTEM_PROMPT
    assert tok.render_chat(thinking).startswith("<|im_start|>system\nYou are an expert mathematician")
    with pytest.raises(TokenizerError, match="thinking mode sets the system prompt"):
        thinking_chat([{"role": "system", "content": "Be brief."}] + chat, tok.family)
    with pytest.raises(TokenizerError, match="internlm2 has no thinking mode"):
        thinking_chat(chat, "internlm2")


def test_convert_and_generate_through_the_cli_equal_hfs_greedy_tokens(ref, v3_tokenizer, tmp_path):

    hf = save_internlm3_folder(ref, CFG, tmp_path / "hf")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(v3_tokenizer / name, hf / name)

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "services.cli", *map(str, args)], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    cli("convert", hf, tmp_path / "ms")
    assert Config.from_checkpoint(tmp_path / "ms").family == "internlm3"
    assert (tmp_path / "ms" / "tokenizer_config.json").read_bytes() == (hf / "tokenizer_config.json").read_bytes()
    prompt = random_ids(20, CFG.vocab_size, seed=4)
    res = json.loads(cli("generate", "--model", tmp_path / "ms", "--ids", ",".join(map(str, prompt)),
                         "--max-new-tokens", "12", "--temperature", "0", "--json"))
    assert res["token_ids"] == hf_greedy(ref, prompt, 12)
    from internlm_core.tokenizer import Tokenizer, thinking_chat

    # thinking mode's system prompt is longer than this tiny model's 64 positions: the refusal counts it
    tok = Tokenizer.for_model(tmp_path / "ms", "internlm3")
    want = len(tok.encode_chat(thinking_chat([{"role": "user", "content": "1 + 1?"}], "internlm3")))
    out = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--model", str(tmp_path / "ms"), "--chat",
                          "--thinking", "1 + 1?"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"prompt of {want} tokens" in out.stderr and want > 1000
