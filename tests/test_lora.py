"""LoRA adapters served by the engine without merging: per-row adapters, equal to the merged
model, the base untouched by adapter 0; bad adapters refused."""
import json

import numpy as np
import pytest

from internlm_core.config import Config
from internlm_core.engine import Engine
from internlm_core.errors import AdapterNotFound
from internlm_core.loader import load_model, save_model
from internlm_core.lora import AdapterError, AdapterSpec, load_adapter, merge_lora, parse_targets
from internlm_core.model import InternLMForCausalLM, init_weights
from tests.helpers import random_adapter

PROMPTS = [[1, 5, 9, 33, 7, 100], [1, 200, 31]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("lora")
    model = InternLMForCausalLM(tiny_config)
    init_weights(model, seed=0, std=0.1)
    base = save_model(model, tiny_config, root / "base")
    # two adapters of different ranks and targets, so stacking must pad and mix
    a1 = random_adapter(tiny_config, AdapterSpec(rank=4, alpha=8, targets=("wq", "wv")), root / "a1", 1)
    a2 = random_adapter(tiny_config, AdapterSpec(rank=8, alpha=4, targets=("wo", "w1", "w2", "w3")), root / "a2", 2)
    return {"base": base, "a1": a1, "a2": a2, "m1": merge_lora(base, a1, root / "m1"),
            "m2": merge_lora(base, a2, root / "m2")}


def engine(folder) -> Engine:
    """fp32 KV caches: the comparisons are of the LoRA arithmetic to fp32 rounding, which an fp16 cache
    amplifies wherever a k/v value sits near an fp16 rounding boundary (seen: 1e-5 on the logits)."""
    return Engine(load_model(folder), max_batch=2, max_len=64, cache_dtype="float32")


@pytest.fixture(scope="module")
def engines(folders):
    """Compiled once per module: the base alone, the base serving a1 and a2, the merged models."""
    lora = engine(folders["base"])
    assert lora.load_adapter("a1", folders["a1"]) == 1 and lora.load_adapter("a2", folders["a2"]) == 2
    return {"base": engine(folders["base"]), "lora": lora, "m1": engine(folders["m1"]), "m2": engine(folders["m2"])}


def step(engine, adapters=None):
    """Prefill both prompts, then one decode step; both logits."""
    pre = engine.prefill([0, 1], PROMPTS, adapters)
    dec = engine.decode(np.array([3, 4]), np.array([len(PROMPTS[0]), len(PROMPTS[1])]), adapters)
    return pre, dec


def test_adapters_per_row_equal_merged_models_and_leave_base_alone(engines):
    assert engines["lora"].adapters == {"a1": 1, "a2": 2} and engines["lora"].adapter_index("a2") == 2
    base_pre, base_dec = step(engines["base"])
    zero_pre, zero_dec = step(engines["lora"], [0, 0])
    assert np.array_equal(base_pre, zero_pre) and np.array_equal(base_dec, zero_dec)  # bit-identical
    mix_pre, mix_dec = step(engines["lora"], [1, 2])  # row 0 uses a1, row 1 uses a2
    m1_pre, m1_dec = step(engines["m1"])
    m2_pre, m2_dec = step(engines["m2"])
    np.testing.assert_allclose(mix_pre[0], m1_pre[0], atol=1e-5)
    np.testing.assert_allclose(mix_dec[0], m1_dec[0], atol=1e-5)
    np.testing.assert_allclose(mix_pre[1], m2_pre[1], atol=1e-5)
    np.testing.assert_allclose(mix_dec[1], m2_dec[1], atol=1e-5)
    assert np.abs(mix_pre[0] - base_pre[0]).max() > 0.1  # the answer changes with the adapter


def greedy(engine, adapter):
    """Eight greedy tokens for PROMPTS[0] in slot 0 (slot 1 idle), with one adapter index."""
    ids = None if adapter is None else [adapter, 0]
    logits = engine.prefill([0, 1], [PROMPTS[0], [1]], ids)[0]
    pos, out = len(PROMPTS[0]), []
    for _ in range(8):
        out.append(int(np.argmax(logits)))
        logits = engine.decode(np.array([out[-1], 0]), np.array([pos, 0]), ids)[0]
        pos += 1
    return out


def test_greedy_answer_follows_the_adapter(engines):
    assert greedy(engines["lora"], 1) == greedy(engines["m1"], None)
    assert greedy(engines["lora"], 2) == greedy(engines["m2"], None)
    assert greedy(engines["lora"], 0) == greedy(engines["base"], None)
    assert greedy(engines["lora"], 1) != greedy(engines["lora"], 0)


def test_replacing_an_adapter_keeps_its_index(folders, engines):
    lora = engine(folders["base"])
    assert lora.load_adapter("x", folders["a1"]) == 1
    assert lora.load_adapter("y", folders["a2"]) == 2
    step(lora, [1, 2])  # compiled with x = a1
    assert lora.load_adapter("x", folders["a2"]) == 1  # same shapes: the compiled graphs must see a2
    m2_pre, m2_dec = step(engines["m2"])
    pre, dec = step(lora, [1, 2])
    np.testing.assert_allclose(pre, m2_pre, atol=1e-5)
    np.testing.assert_allclose(dec, m2_dec, atol=1e-5)  # the decode step too (rebuilt with the new stacks)


def test_bad_adapters_are_refused(folders, tmp_path, tiny_config):
    engine = Engine(load_model(folders["base"]), max_batch=2, max_len=64)
    with pytest.raises(AdapterNotFound, match="nope"):
        engine.adapter_index("nope")
    with pytest.raises(ValueError, match="out of range"):
        engine.prefill([0, 1], PROMPTS, [0, 1])  # nothing loaded
    with pytest.raises(AdapterError, match="not an adapter folder"):
        engine.load_adapter("base", folders["base"])
    other = Config.from_name("tiny", hidden_size=32, num_heads=4)
    wrong = random_adapter(other, AdapterSpec(rank=2, alpha=2), tmp_path / "wrong", 3)
    with pytest.raises(AdapterError, match="different model"):
        engine.load_adapter("wrong", wrong)
    meta = json.loads((folders["a1"] / "adapter_config.json").read_text())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text(json.dumps({**meta, "rank": 5}))
    (tmp_path / "broken" / "adapter.safetensors").write_bytes((folders["a1"] / "adapter.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="expected"):
        engine.load_adapter("broken", tmp_path / "broken")
    assert engine.adapters == {}


def test_target_patterns():
    assert parse_targets("wq|wk|wv|wo") == ("wq", "wk", "wv", "wo")
    assert parse_targets("w[qv]") == ("wq", "wv")
    assert parse_targets("wq, w1") == ("wq", "w1")
    assert parse_targets(".*") == ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    for bad in ("", "q_proj", "w("):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_served_adapter_equals_peft_on_the_hf_model(tiny_hf, tiny_model_dir, tmp_path):
    """An adapter served by the engine (not merged) against HF PEFT's LoRA on the HF model with the
    same base weights and the same A/B, alpha and rank on every target linear: logits after the
    prompt within 1e-4, and the same greedy tokens."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from internlm_core.convert import hf_name
    from internlm_core.lora import ALL_TARGETS, target_modules

    cfg = load_model(tiny_model_dir).config
    spec = AdapterSpec(rank=4, alpha=12.0, dropout=0.0, targets=ALL_TARGETS)
    folder = random_adapter(cfg, spec, tmp_path / "adapter", seed=5, std=0.3)
    weights = load_adapter(folder, cfg)[1]
    rng = np.random.default_rng(5)

    hf_module = {m: hf_name(f"{m}.weight").removesuffix(".weight") for m in target_modules(cfg, spec.targets)}
    peft_model = get_peft_model(copy.deepcopy(tiny_hf[0]), LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, init_lora_weights=False,
        target_modules=sorted({path.rsplit(".", 1)[1] for path in hf_module.values()}))).eval()
    with torch.no_grad():
        for m, path in hf_module.items():
            layer = peft_model.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(weights[f"{m}.lora_a"]))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(weights[f"{m}.lora_b"]))

    engine = Engine(load_model(tiny_model_dir), max_batch=1, max_len=64, cache_dtype="float32")  # logits at 1e-4
    index = engine.load_adapter("peft-parity", folder)
    prompt = list(rng.integers(0, cfg.vocab_size, 9))
    ours, tokens = [engine.prefill([0], [prompt], adapters=[index])[0]], []
    for step in range(12):
        tokens.append(int(np.argmax(ours[-1])))
        ours.append(engine.decode(np.array([tokens[-1]]), np.array([len(prompt) + step]), adapters=[index])[0])
    with torch.no_grad():
        ref = peft_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:].numpy()
    np.testing.assert_allclose(np.array(ours), ref, atol=1e-4, rtol=0)
    assert tokens == [int(t) for t in ref[:-1].argmax(-1)]


def test_chunked_prefill_with_adapters_equals_the_merged_models(engines, monkeypatch):
    """Long prompts under two adapters and the base, fed in chunks through the batcher (with the CPU
    kernels every prompt's chunk in one step; with MindSpore's ops chunks near the start together,
    later ones a row at a time), decode to the greedy tokens of the merged models prefilled in one
    piece."""
    import internlm_core.engine as engine_mod
    from internlm_core.batching import Batcher
    from internlm_core.generation import SamplingParams, generate

    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(engine_mod, "PREFILL_MIN", 8)
    monkeypatch.setattr(engine_mod, "MIN_ATTEND", 16)
    lora = engines["lora"]
    monkeypatch.setattr(lora, "prefill_chunk", 16)
    rng = np.random.default_rng(11)
    prompts = [list(rng.integers(0, 512, n)) for n in (45, 30)]
    params = SamplingParams(max_new_tokens=8, stop_token_ids=[], ignore_eos=True)
    b = Batcher(lora, prefix_cache=False).start()
    try:
        for name in ("a1", "a2", None):
            got = [[e.token_id for e in h] for h in [b.submit(p, params, adapter=name) for p in prompts]]
            reference = engines["m1" if name == "a1" else "m2" if name == "a2" else "base"]
            monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 128)  # the reference: one piece
            want = [[e.token_id for e in generate(reference, p, params)] for p in prompts]
            monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 16)
            assert got == want, name
    finally:
        b.stop(timeout=60)
    if lora.kernels:  # both prompts' chunks further in went through together
        assert any(rows == 2 and tokens == 16 for rows, tokens, _ in lora.shapes_run)
    else:  # chunks further in ran alone
        assert any(rows == 1 and a > 16 for rows, _, a in lora.shapes_run)
