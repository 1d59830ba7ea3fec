"""int8 weight-only quantisation: the per-channel rule against float64 numpy, quantise -> store ->
load bit-exact, every path that reads a quantised folder, and the accuracy bound on the
self-trained demo model (WikiText-2 valid perplexity within 1%, greedy tokens agreeing)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from internlm_core.checkpoint import SafetensorsFile, bf16_to_f32
from internlm_core.config import Config
from internlm_core.convert import hf_to_ms, ms_to_hf
from internlm_core.errors import CheckpointError
from internlm_core.quantize import dequantize_int8, quantize_int8, quantized_names, scale_name
from tests.helpers import REPO, hf_reference_model, save_hf_folder


def test_per_channel_int8_against_float64():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (48, 77)).astype(np.float32)
    w[5] = 0.0  # an all-zero row keeps scale 1 and zeros
    w[7, 3] = 0.5  # an outlier sets its row's scale alone
    q, scale = quantize_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (48,)
    amax = np.abs(w.astype(np.float64)).max(1)
    want_scale = np.where(amax > 0, amax / 127.0, 1.0)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    want_q = np.clip(np.rint(w.astype(np.float64) / want_scale[:, None]), -127, 127)
    assert np.abs(q.astype(np.float64) - want_q).max() <= 1  # ties may round either way in float32
    assert (np.abs(q) <= 127).all() and (q[5] == 0).all() and q[7, 3] == 127
    err = np.abs(dequantize_int8(q, scale).astype(np.float64) - w)
    assert (err <= scale[:, None] * (0.5 + 1e-3)).all()  # at most half a step per element
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(np.zeros(4))


@pytest.fixture(scope="module")
def bf16_hf(tmp_path_factory):
    cfg = Config.from_name("tiny")
    ref = hf_reference_model(cfg, seed=3)
    return cfg, save_hf_folder(ref, cfg, tmp_path_factory.mktemp("q") / "hf", dtype="bfloat16")


def test_quantise_store_load_is_bit_exact(bf16_hf, tmp_path):
    cfg, hf = bf16_hf
    out = hf_to_ms(hf, tmp_path / "q8", quantize="int8")
    assert out.quantization == "int8" and out.dtype == "bfloat16"
    saved = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert saved["quantization"] == "int8"
    hf_to_ms(hf, tmp_path / "plain")
    plain = SafetensorsFile(tmp_path / "plain" / "model.safetensors")
    q8 = SafetensorsFile(tmp_path / "q8" / "model.safetensors")
    names = set(quantized_names(cfg))
    assert len(names) == 7 * cfg.num_layers + 1 and "lm_head.weight" in names
    assert "model.tok_embeddings.embedding_weight" not in names
    for name in cfg.param_shapes():
        source = plain.get(name)
        if name in names:
            q, scale = quantize_int8(bf16_to_f32(source))
            assert q8.info(name)[0] == "I8" and q8.info(scale_name(name))[0] == "F32"
            assert np.array_equal(q8.get(name), q) and np.array_equal(q8.get(scale_name(name)), scale), name
        else:  # embedding, norms, biases keep the checkpoint's own bytes
            assert q8.info(name)[0] == "BF16" and np.array_equal(q8.get(name), source), name


def test_a_quantised_folder_serves_its_dequantised_weights_and_is_not_written_back_as_hf(bf16_hf, tmp_path):
    from internlm_core.loader import load_model, state_dict
    from internlm_core.model import forward_inputs

    cfg, hf = bf16_hf
    hf_to_ms(hf, tmp_path / "q8", quantize="int8")
    hf_to_ms(hf, tmp_path / "plain")
    q8 = SafetensorsFile(tmp_path / "q8" / "model.safetensors")
    model = load_model(tmp_path / "q8")
    weights = state_dict(model)
    for name in quantized_names(cfg):
        np.testing.assert_array_equal(weights[name], dequantize_int8(q8.get(name), q8.get(scale_name(name))))
    ids = forward_inputs(cfg, np.array([[1, 5, 9, 33, 200, 7]]))
    ours, full = model(*ids).asnumpy(), load_model(tmp_path / "plain")(*ids).asnumpy()
    assert 0 < np.abs(ours - full).max() < 0.05 * np.abs(full).max()  # close, and not the same weights
    with pytest.raises(CheckpointError, match="holds int8 weights, which HF folders do not"):
        ms_to_hf(tmp_path / "q8", tmp_path / "back")


def test_the_cli_converts_with_quantize(bf16_hf, tmp_path):
    _, hf = bf16_hf
    out = subprocess.run([sys.executable, "-m", "services.cli", "convert", str(hf), str(tmp_path / "q8"),
                          "--quantize", "int8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "linears int8" in out.stdout and Config.from_checkpoint(tmp_path / "q8").quantization == "int8"
    bad = subprocess.run([sys.executable, "-m", "services.cli", "convert", str(tmp_path / "q8"), str(tmp_path / "hf"),
                          "--to-hf", "--quantize", "int8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--quantize applies to HF -> MindSpore conversion" in bad.stderr


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """(the self-trained demo model, the same model converted with int8 linears)."""
    from internlm_core import demo

    root = tmp_path_factory.mktemp("demo-int8")
    folder = demo.ensure_demo_model(root / "models")
    ms_to_hf(folder, root / "hf")
    hf_to_ms(root / "hf", root / "int8", quantize="int8")
    return folder, root / "int8"


def test_int8_keeps_the_demo_models_perplexity_and_greedy_tokens(demo_pair):
    """The accuracy bound: WikiText-2 valid perplexity within 1% of the float32 model's, and the
    int8 model's greedy choice equal to the float32 model's at >= 90% of 256 positions (8 prompts x
    the float32 model's 32 greedy tokens, each position given the same prefix: llama.cpp's "same top
    token" measure). Free-running sequences are not compared position by position: after the first
    near-tie they continue differently, which says nothing of the positions after it (this weakly
    trained model has such ties; rounding its weights to bf16 alone changes one prompt's first token)."""
    from internlm_core.engine import Engine
    from internlm_core.generation import SamplingParams, generate
    from internlm_core.loader import load_model
    from internlm_core.model import forward_inputs
    from internlm_core.tokenizer import Tokenizer
    from tests.helpers import DATA

    full_dir, int8_dir = demo_pair
    tok = Tokenizer()
    lines = [s.strip() for s in (DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
             if len(s.strip()) > 200]
    ids = tok.encode(" ".join(lines[:40]))[:8 * 257]
    rows = np.array(ids).reshape(8, 257)

    def logits_of(model, seq):
        return model(*forward_inputs(model.config, seq)).asnumpy().astype(np.float64)

    def perplexity(model):
        logits = logits_of(model, rows[:, :-1])
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = lse - np.take_along_axis(logits, rows[:, 1:, None], -1)[..., 0]
        return float(np.exp(nll.mean()))

    full, int8 = load_model(full_dir), load_model(int8_dir)
    ppl_full, ppl_int8 = perplexity(full), perplexity(int8)
    assert abs(ppl_int8 / ppl_full - 1) < 0.01, (ppl_full, ppl_int8)
    params = SamplingParams(max_new_tokens=32, stop_token_ids=[], ignore_eos=True)
    engine = Engine(full, max_batch=1, max_len=256)
    agree = 0
    for line in lines[40:48]:
        prompt = tok.encode(line[:120])
        greedy = [e.token_id for e in generate(engine, prompt, params)]
        chosen = logits_of(int8, np.array([prompt + greedy]))[0, len(prompt) - 1:-1].argmax(-1)
        agree += int((chosen == np.array(greedy)).sum())
    assert agree >= 0.9 * 256, agree
