"""The project's checkpoints load by name into MindFormers 1.9.0 (the framework of its research/internlm) and give
the same logits. MindFormers runs forward on CPU only with the settings below (mindspore-cpu.md)."""
import importlib
import importlib.util
import os

import numpy as np
import pytest

from internlm_core.loader import load_model
from internlm_core.model import forward_inputs
from tests.helpers import random_ids


def import_mindformers():
    """MindFormers' llama module. Skipped only where the package is not installed at all (outside
    CI); an installed MindFormers that fails to import, or a CI run without it, fails the test."""
    if importlib.util.find_spec("mindformers") is None:
        if os.environ.get("CI"):
            pytest.fail("mindformers is part of the test extras (bash scripts/setup.sh test) but is not installed")
        pytest.skip("install the 'mindformers' extra (bash scripts/setup.sh test)")
    return importlib.import_module("mindformers.models.llama")


def test_checkpoint_loads_into_mindformers_llama(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MindFormers writes its logs under ./output
    mf = import_mindformers()
    import mindspore as ms

    ours = load_model(tiny_model_dir)
    cfg = ours.config
    mcfg = mf.LlamaConfig(
        batch_size=1, seq_length=24, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embedding=cfg.max_position_embeddings,
        qkv_has_bias=True, attn_proj_has_bias=True,  # InternLM-7B's biases
        compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
        rotary_dtype="float32", param_init_type="float32",
        use_past=False, use_flash_attention=False, use_rope_slice=True, fused_rms_norm=False,
        checkpoint_name_or_path="")
    net = mf.LlamaForCausalLM(mcfg)
    net.set_train(False)
    params = ms.load_checkpoint(str(tiny_model_dir / "model.safetensors"), format="safetensors")
    assert set(params) == set(cfg.param_shapes())
    not_loaded, unexpected = ms.load_param_into_net(net, params, strict_load=True)
    assert not_loaded == [] and unexpected == []
    assert {n for n, _ in net.parameters_and_names()} == set(params)

    ids = np.array([random_ids(24, cfg.vocab_size, seed=4)], np.int32)
    theirs = net(ms.Tensor(ids))[0].asnumpy()
    mine = ours(*forward_inputs(cfg, ids)).asnumpy()
    np.testing.assert_allclose(theirs.reshape(mine.shape), mine, atol=1e-4, rtol=0)


def test_ci_turns_a_missing_mindformers_into_a_failure(monkeypatch):
    """.ci/run sets CI itself (a runner may not), and with CI set a missing MindFormers fails the
    interop test instead of skipping it."""
    from tests.helpers import REPO

    run = (REPO / ".ci" / "run").read_text().splitlines()
    assert run.index("export CI=true") < run.index("exec bash scripts/test.sh -q")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if it were not installed
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        import_mindformers()
