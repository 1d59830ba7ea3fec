"""Parity with the reference implementation: HF transformers' LLaMA with attention bias is
InternLM-7B's network (without bias, InternLM-20B's). Same weights via the project's converter."""
import numpy as np
import pytest

from internlm_core.config import Config
from internlm_core.convert import hf_to_ms
from internlm_core.loader import load_model
from internlm_core.model import forward_inputs, rope_base
from tests.helpers import hf_logits, hf_reference_model, random_ids, save_hf_folder



@pytest.fixture(scope="module")
def tiny_pair(tiny_hf, tiny_model_dir):
    return tiny_hf[0], load_model(tiny_model_dir)


@pytest.mark.parametrize("n", [1, 7, 33, 128])
def test_logits_match_hf(tiny_pair, n):
    ref, ours = tiny_pair
    ids = random_ids(n, ours.config.vocab_size, seed=n)
    out = ours(*forward_inputs(ours.config, np.array([ids]))).asnumpy()[0]
    np.testing.assert_allclose(out, hf_logits(ref, ids), atol=1e-4, rtol=0)


def test_padded_batch_matches_each_prompt_alone(tiny_pair):
    ref, ours = tiny_pair
    prompts = [random_ids(n, 512, seed=n) for n in (5, 19, 12)]
    t = max(map(len, prompts))
    ids = np.full((3, t), 2, np.int64)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    out = ours(*forward_inputs(ours.config, ids, [len(p) for p in prompts])).asnumpy()
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(out[i, :len(p)], hf_logits(ref, p), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny20b_pair(tmp_path_factory):
    cfg = Config.from_name("tiny-20b")
    ref = hf_reference_model(cfg, seed=3)
    folder = save_hf_folder(ref, cfg, tmp_path_factory.mktemp("hf20") / "tiny-20b")
    dst = tmp_path_factory.mktemp("ms20") / "m"
    hf_to_ms(folder, dst)
    return ref, load_model(dst)


@pytest.mark.parametrize("n", [9, 64, 80])
def test_20b_shape_no_bias_and_dynamic_ntk(tiny20b_pair, n):
    """No q/k/v/o bias; past max positions (64) the dynamic-NTK base takes over, as in HF."""
    ref, ours = tiny20b_pair
    assert not any(name.endswith("bias") for name, _ in ours.parameters_and_names())
    ids = random_ids(n, 512, seed=n)
    out = ours(*forward_inputs(ours.config, np.array([ids]))).asnumpy()[0]
    np.testing.assert_allclose(out, hf_logits(ref, ids), atol=1e-4, rtol=0)


def test_dynamic_ntk_base_formula():
    cfg = Config.from_name("tiny-20b")
    assert rope_base(cfg, 64) == cfg.rope_base
    d = cfg.head_dim
    assert rope_base(cfg, 128) == pytest.approx(10000 * (128 / 64) ** (d / (d - 2)))


def test_half_precision_compute(tiny_model_dir, tiny_pair):
    """Weights of any stored dtype load; fp16 compute runs on CPU close to fp32; bf16 compute is refused."""
    half = load_model(tiny_model_dir, compute_dtype="float16")
    ids = np.array([random_ids(16, 512, seed=11)])
    a = half(*forward_inputs(half.config, ids)).asnumpy()
    b = tiny_pair[1](*forward_inputs(half.config, ids)).asnumpy()
    # fp16 rounds each result to u = 2**-11 (4.9e-4) relative; between the embedding and the logits
    # this 2-layer model rounds ~30 times in series (per layer: norm, q/k/v, scores, softmax, mix,
    # o, norm, gate/up, act, down; plus the head), so relative errors add up to at most ~30u = 1.5%
    # of the logits' scale. Measured: 0.4% here, 0.7-1.5% with weights of std 0.5.
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= 30 * 2.0 ** -11, err
    with pytest.raises(ValueError, match="bfloat16 compute"):
        load_model(tiny_model_dir, compute_dtype="bfloat16")


def test_fused_projections_match_hf_and_hold_one_copy(tiny_hf, tiny_model_dir):
    """The serving form (one q/k/v matmul, one gate/up matmul, rotary as a matmul, the score
    scale folded into q's tables) computes HF's logits, holds the weights it fuses once, and
    leaves the model it was made from as it was."""
    from internlm_core.forms import MindSporeOps

    source = load_model(tiny_model_dir)
    before = sum(int(np.prod(p.shape)) for p in source.get_parameters())
    model = source.serving_form(MindSporeOps())
    assert model.serving_form(MindSporeOps()) is model  # already that form
    assert not source.fused and "model.layers.0.attention.wq.weight" in dict(source.parameters_and_names())
    names = {n for n, _ in model.parameters_and_names()}
    assert "model.layers.0.attention.wqkv.weight" in names and "model.layers.0.feed_forward.w13.weight" in names
    assert not any(".wq." in n or ".wk." in n or ".wv." in n or ".w1." in n or ".w3." in n for n in names)
    assert sum(int(np.prod(p.shape)) for p in model.get_parameters()) == before
    h, i = model.config.hidden_size, model.config.intermediate_size
    assert model.linear_for("model.layers.1.attention.wk")[1:] == (1, [h, h, h])  # part 1 of q, k, v rows
    assert model.linear_for("model.layers.1.feed_forward.w3")[1:] == (1, [i, i])
    ids = random_ids(21, model.config.vocab_size, seed=3)
    out = model(*forward_inputs(model.config, np.array([ids]))).asnumpy()[0]
    np.testing.assert_allclose(out, hf_logits(tiny_hf[0], ids), atol=1e-4, rtol=0)
