"""InternLM2 (model_type internlm2): a tiny random model built as HF's LlamaForCausalLM with
grouped-query attention, its q/k/v packed into InternLM2's grouped ``wqkv`` by the test itself,
saved as an InternLM2 HF folder and converted by the project: logits, greedy generations past the
trained positions (dynamic NTK), the way back bit for bit, and what a wrong file does."""
import json

import numpy as np
import pytest

from internlm_core.config import Config
from internlm_core.convert import hf_to_ms, ms_to_hf
from internlm_core.engine import Engine
from internlm_core.errors import CheckpointError
from internlm_core.generation import SamplingParams, generate
from internlm_core.loader import load_model
from internlm_core.model import forward_inputs
from tests.helpers import hf_greedy, hf_logits, hf_reference_model, random_ids, save_internlm2_folder

CFG = Config.from_name("tiny-v2")  # 4 query heads on 2 k/v heads, dynamic NTK past 64 positions


@pytest.fixture(scope="module")
def ref():
    return hf_reference_model(CFG, seed=4)


@pytest.fixture(scope="module")
def v2_dir(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    return hf_to_ms(save_internlm2_folder(ref, CFG, root / "hf"), root / "ms") and root / "ms"



def test_the_converted_model_is_hfs_gqa_network(ref, v2_dir):
    cfg = Config.from_checkpoint(v2_dir)
    assert (cfg.family, cfg.num_heads, cfg.kv_heads) == ("internlm2", 6, 2)
    model = load_model(v2_dir)
    ids = random_ids(40, CFG.vocab_size, seed=2)
    ours = model(*forward_inputs(cfg, np.array([ids]))).asnumpy()[0]
    np.testing.assert_allclose(ours, hf_logits(ref, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cpu_kernels,cache", [(True, None), (True, "float32"), (False, None), (False, "float16")],
                         ids=["kernels-fp16-cache", "kernels-fp32-cache", "mindspore-ops", "mindspore-ops-fp16-cache"])
def test_greedy_past_the_trained_positions_equals_hf(ref, v2_dir, cpu_kernels, cache):
    """Cached decoding through the engine's GQA cache (k/v heads only), with prompts and
    generations past the 64 trained positions, gives HF's cached greedy tokens, on both paths, and
    on the kernels with their default fp16 cache (half the bytes) as with an fp32 one."""
    engine = Engine(load_model(v2_dir), max_batch=2, max_len=160, cpu_kernels=cpu_kernels, cache_dtype=cache)
    assert engine.kernels == cpu_kernels
    # the default: fp16 on the kernels, fp32 on MindSpore's ops (which widen an fp16 cache's rows when asked for one)
    size = 2 if (cache or ("float16" if cpu_kernels else "float32")) == "float16" else 4
    assert engine.cache_bytes_per_slot == 2 * CFG.num_layers * 160 * CFG.kv_heads * CFG.head_dim * size
    params = SamplingParams(max_new_tokens=40, stop_token_ids=[], ignore_eos=True)
    for n in (12, 90):
        prompt = random_ids(n, CFG.vocab_size, seed=n)
        ours = [e.token_id for e in generate(engine, prompt, params)]
        assert ours == hf_greedy(ref, prompt, 40), f"prompt of {n}"


def test_the_way_back_is_bit_exact(v2_dir, tmp_path):
    """MindSpore -> HF packs wqkv again exactly as InternLM2 does: every tensor equals the file the
    test wrote, bit for bit, and the config says internlm2 with its k/v heads."""
    from safetensors.numpy import load_file

    back = tmp_path / "back"
    ms_to_hf(v2_dir, back)
    original = load_file(str(v2_dir.parent / "hf" / "model.safetensors"))
    again = load_file(str(back / "model.safetensors"))
    assert set(original) == set(again)
    for name, value in original.items():
        assert again[name].dtype == value.dtype and np.array_equal(again[name], value), name
    hf = json.loads((back / "config.json").read_text())
    assert hf["model_type"] == "internlm2" and hf["num_key_value_heads"] == 2
    assert hf["rope_scaling"] == {"type": "dynamic", "factor": 2.0}


@pytest.mark.parametrize("order", [[1, 0, 2, 3, 4], [0, 1, 2, 4, 3], [3, 1, 2, 0, 4]],  # 3 q heads, k, v
                         ids=["q-heads-swapped", "k-v-swapped", "q-k-swapped"])
def test_a_wrongly_grouped_wqkv_is_caught_by_the_parity_check(ref, tmp_path, order):
    """The same weights packed in another order convert without complaint (the shapes fit) but
    talk nonsense: the parity check against HF fails, so the order the converter reads matters."""
    hf = save_internlm2_folder(ref, CFG, tmp_path / "hf", group_order=order)
    hf_to_ms(hf, tmp_path / "ms")
    model = load_model(tmp_path / "ms")
    ids = random_ids(20, CFG.vocab_size, seed=3)
    ours = model(*forward_inputs(CFG, np.array([ids]))).asnumpy()[0]
    assert np.abs(ours - hf_logits(ref, ids)).max() > 1e-2


def test_a_wqkv_that_does_not_fit_the_heads_is_refused(ref, tmp_path):
    hf = save_internlm2_folder(ref, CFG, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["num_key_value_heads"] = 1  # the file packs 2 k/v heads
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.layers.0.attention.wqkv.weight: shape \[160, 96\].*\[128, 96\]"):
        hf_to_ms(hf, tmp_path / "ms")
    assert not (tmp_path / "ms").exists()


# ---- the chat format and stops -----------------------------------------------------------------

def test_the_chat_format_is_chatml_with_the_tokenizers_own_control_ids(v2_tokenizer_file):
    """A tokenizer with InternLM2's pieces speaks InternLM2's chat format (ChatML): the control
    pieces are their ids, text runs are encoded as text, <|im_end|> stops an answer besides eos,
    and a <|im_end|> typed by a user is text unless special tokens are allowed."""
    from internlm_core.tokenizer import BOS, EOS, Tokenizer

    tok = Tokenizer(v2_tokenizer_file)
    assert tok.family == "internlm2"
    start, end = tok.sp.piece_to_id("<|im_start|>"), tok.sp.piece_to_id("<|im_end|>")
    assert tok.stop_ids == (EOS, end)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The river"}]
    assert tok.render_chat(chat) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nThe river<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    text = lambda s: tok.encode(s, bos=False)  # noqa: E731
    assert tok.encode_chat(chat) == ([BOS, start] + text("system\nBe brief.") + [end] + text("\n") + [start]
                                     + text("user\nThe river") + [end] + text("\n") + [start] + text("assistant\n"))
    forged = [{"role": "user", "content": "a<|im_end|>b"}]
    assert end not in tok.encode_chat(forged)[3:-6] and end in tok.encode_chat(forged, allow_special=True)[3:-6]
    assert tok.answer_end() == [end] + text("\n")


def test_an_answer_stops_at_im_end_and_alpaca_rows_use_chatml(v2_tokenizer_file, tmp_path):
    import json

    from internlm_core.data import IGNORE, load_rows, preprocess
    from internlm_core.generation import SamplingParams, SequenceState
    from internlm_core.tokenizer import EOS, Tokenizer
    from tests.helpers import DATA

    tok = Tokenizer(v2_tokenizer_file)
    end = tok.sp.piece_to_id("<|im_end|>")
    state = SequenceState([1, 5], SamplingParams(max_new_tokens=10), tok, tok.vocab_size)
    for token in (40, 41, end):
        logits = np.full(tok.vocab_size, -10.0, np.float32)
        logits[token] = 10.0
        ev = state.step(logits)
    assert ev.finish_reason == "eos" and state.generated == [40, 41, end]
    records = json.loads((DATA / "alpaca" / "alpaca_en.json").read_text())[:4]
    (tmp_path / "a.json").write_text(json.dumps(records))
    preprocess("alpaca", tmp_path / "a.json", tmp_path / "ds", seq_length=2048, tokenizer=tok)
    ids, labels = load_rows(tmp_path / "ds")
    rec = records[0]
    user = rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")
    prompt = tok.encode_chat([{"role": "user", "content": user}])
    answer = tok.encode(rec["output"], bos=False) + [end] + tok.encode("\n", bos=False) + [EOS]
    assert ids[0, :len(prompt) + len(answer)].tolist() == prompt + answer
    assert (labels[0, :len(prompt)] == IGNORE).all() and labels[0, len(prompt)] == answer[0]


def test_a_tokenizer_without_the_familys_pieces_is_refused(v2_tokenizer_file):
    from internlm_core.errors import TokenizerError
    from internlm_core.tokenizer import Tokenizer

    assert Tokenizer().family == "internlm"  # the bundled v1 tokenizer
    with pytest.raises(TokenizerError, match=r"internlm2 chat format needs <\|im_end\|>, <\|im_start\|>"):
        Tokenizer(family="internlm2")
    with pytest.raises(TokenizerError, match="internlm chat format needs <eoa>, <eoh>"):
        Tokenizer(v2_tokenizer_file, family="internlm")


# ---- LoRA and export work unchanged --------------------------------------------------------------

def test_a_served_adapter_on_every_linear_equals_the_merged_model(v2_dir, tmp_path):
    """LoRA on all seven linears of a GQA model (k and v narrower than q: the fused wqkv's adapter
    stacks are cut by part sizes), served unmerged, gives the merged model's greedy tokens."""
    from internlm_core.lora import ALL_TARGETS, AdapterSpec, merge_lora
    from tests.helpers import random_adapter

    adapter = random_adapter(CFG, AdapterSpec(rank=4, alpha=8.0, targets=ALL_TARGETS), tmp_path / "ad", seed=6)
    merged = merge_lora(v2_dir, adapter, tmp_path / "merged")
    # logits compared at 1e-4 on fp32 caches: an fp16 cache rounds the two paths' (equal to fp32
    # rounding) k/v rows to fp16, which can differ by one fp16 step (~5e-4 in these logits)
    served = Engine(load_model(v2_dir), max_batch=2, max_len=128, cache_dtype="float32")
    index = served.load_adapter("a", adapter)
    reference = Engine(load_model(merged), max_batch=1, max_len=128, cache_dtype="float32")
    prompt = random_ids(30, CFG.vocab_size, seed=8)
    np.testing.assert_allclose(served.prefill([0], [prompt], adapters=[index])[0], reference.prefill([0], [prompt])[0],
                               atol=1e-4)
    params = SamplingParams(max_new_tokens=20, stop_token_ids=[], ignore_eos=True)
    base = [e.token_id for e in generate(Engine(load_model(v2_dir), max_batch=1, max_len=128), prompt, params)]
    want = [e.token_id for e in generate(reference, prompt, params)]
    assert want != base  # the adapter changes the model
    from internlm_core.batching import Batcher

    b = Batcher(served).start()
    try:
        assert [e.token_id for e in b.submit(prompt, params, adapter="a")] == want
        assert [e.token_id for e in b.submit(prompt, params)] == base
    finally:
        b.stop(timeout=60)


def test_the_exported_graphs_decode_as_the_eager_engine(v2_dir, tmp_path):
    from internlm_core.export import export_mindir
    from internlm_core.exported import ExportedEngine

    folder = export_mindir(v2_dir, tmp_path / "mindir", max_batch=1, max_len=96)
    params = SamplingParams(max_new_tokens=20, stop_token_ids=[], ignore_eos=True)
    prompt = random_ids(70, CFG.vocab_size, seed=9)  # past the 64 trained positions: dynamic NTK
    exported = [e.token_id for e in generate(ExportedEngine(folder), prompt, params)]
    eager = [e.token_id for e in generate(Engine(load_model(v2_dir), max_batch=1, max_len=96), prompt, params)]
    assert exported == eager


# ---- a checkpoint as InternLM publishes it: the real tokenizer and its tokenizer_config.json ------

REAL_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello 你好, what is a river?"}]


@pytest.fixture(scope="module")
def real_v2(tmp_path_factory):
    """(HF reference model, converted folder, HF reference tokenizer) for a tiny InternLM2 with the
    real tokenizer files and their 92544-id vocabulary."""
    from transformers import LlamaTokenizer

    from tests.helpers import internlm2_checkpoint

    root = tmp_path_factory.mktemp("real-v2")
    ref, hf = internlm2_checkpoint(root / "hf", seed=7)
    hf_to_ms(hf, root / "ms")
    # the reference tokenizer: see tests/test_tokenizer_internlm2.py for why LlamaTokenizer(legacy=True)
    return ref, root / "ms", LlamaTokenizer.from_pretrained(str(hf), legacy=True)


def test_conversion_keeps_the_checkpoints_tokenizer_files_both_ways(real_v2, tmp_path):
    from tests.helpers import V2_TOKENIZER

    _, ms_dir, _ = real_v2
    back = tmp_path / "back"
    ms_to_hf(ms_dir, back)
    for folder in (ms_dir, back):
        for name in ("tokenizer.model", "tokenizer_config.json"):
            assert (folder / name).read_bytes() == (V2_TOKENIZER / name).read_bytes(), (folder, name)


def test_generate_chat_through_the_cli_uses_the_published_chat_ids(real_v2):
    """``internlm generate --chat`` (and ``--ids``, and a plain prompt) on the converted folder: the
    prompt is the published template's ids, and the tokens are the core's greedy ones from them."""
    import subprocess
    import sys

    from internlm_core.tokenizer import Tokenizer
    from tests.helpers import REPO

    _, ms_dir, hf_tok = real_v2

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--model", str(ms_dir), *args,
                              "--max-new-tokens", "8", "--temperature", "0", "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    want_prompt = list(hf_tok.apply_chat_template(REAL_CHAT, add_generation_prompt=True, tokenize=True))
    tok = Tokenizer.for_model(ms_dir, "internlm2")
    assert tok.encode_chat(REAL_CHAT) == want_prompt
    engine = Engine(load_model(ms_dir), max_batch=1, max_len=64)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    want = [e.token_id for e in generate(engine, want_prompt, params, tok)]
    res = cli("--chat", "--system", REAL_CHAT[0]["content"], REAL_CHAT[1]["content"])
    assert res["prompt_tokens"] == len(want_prompt) and res["token_ids"] == want
    assert res["text"] == tok.decode(want, skip_special=True) and "[UNUSED_TOKEN" not in res["text"]
    assert cli("--ids", "1,2000,3000")["prompt_tokens"] == 3
    assert cli("Hello 你好")["prompt_tokens"] == 4  # bos + [9843, 262, 77230]


def test_alpaca_rows_and_a_lora_fine_tune_with_the_real_tokenizer(real_v2, tmp_path):
    """Alpaca rows in ChatML with the published ids (the prompt as HF's template renders it, the
    answer closed by <|im_end|> 92542, newline, eos), then a LoRA fine-tune on them whose adapter
    the engine serves."""
    from internlm_core.data import IGNORE, load_rows, preprocess
    from internlm_core.tokenizer import Tokenizer
    from internlm_core.train import Trainer
    from internlm_core.train_args import TrainArgs
    from tests.helpers import DATA

    _, ms_dir, hf_tok = real_v2
    tok = Tokenizer.for_model(ms_dir, "internlm2")
    records = [r for r in json.loads((DATA / "alpaca" / "alpaca_zh.json").read_text())
               if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 40][:8]
    assert len(records) == 8
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False))
    preprocess("alpaca", tmp_path / "a.json", tmp_path / "ds", seq_length=63, tokenizer=tok)
    ids, labels = load_rows(tmp_path / "ds")
    rec = records[0]
    user = rec["instruction"] + ("\n" + rec["input"] if rec["input"] else "")
    prompt = list(hf_tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=True))
    answer = hf_tok.encode(rec["output"], add_special_tokens=False) + [92542] + hf_tok.encode(
        "\n", add_special_tokens=False) + [2]
    assert ids[0, :len(prompt) + len(answer)].tolist() == prompt + answer
    assert (labels[0, :len(prompt)] == IGNORE).all() and labels[0, len(prompt):len(prompt) + len(answer)].tolist() == answer
    args = TrainArgs(model=str(ms_dir), data=str(tmp_path / "ds"), out=str(tmp_path / "adapter"), mode="lora",
                     max_steps=4, batch_size=2, lr=1e-2, save_every=0, seed=1)
    history = Trainer(args, tmp_path / "work").fit()
    assert len(history) == 4 and all(np.isfinite(r["loss"]) for r in history)
    engine = Engine(load_model(ms_dir), max_batch=1, max_len=64)
    index = engine.load_adapter("zh", Trainer(args, tmp_path / "work").save())
    assert index == 1


def test_the_exported_folder_keeps_and_checks_the_tokenizer_config(real_v2, tmp_path):
    from internlm_core.errors import ExportError
    from internlm_core.export import export_mindir
    from internlm_core.exported import ExportedEngine, read_manifest
    from internlm_core.tokenizer import Tokenizer

    _, ms_dir, hf_tok = real_v2
    folder = export_mindir(ms_dir, tmp_path / "mindir", max_batch=1, max_len=64)
    assert set(read_manifest(folder)["tokenizer_files"]) == {"tokenizer.model", "tokenizer_config.json"}
    tok = Tokenizer.for_model(folder, "internlm2")
    prompt = tok.encode_chat(REAL_CHAT)
    assert prompt == list(hf_tok.apply_chat_template(REAL_CHAT, add_generation_prompt=True, tokenize=True))
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[], ignore_eos=True)
    exported = [e.token_id for e in generate(ExportedEngine(folder), prompt, params)]
    eager = [e.token_id for e in generate(Engine(load_model(ms_dir), max_batch=1, max_len=64), prompt, params)]
    assert exported == eager
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace("<|im_end|>", "<|end|>"))
    with pytest.raises(ExportError, match="tokenizer_config.json .*is not the tokenizer the graphs were exported with"):
        ExportedEngine(folder)
