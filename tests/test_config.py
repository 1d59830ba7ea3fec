import json

import pytest

from internlm_core.config import PRESETS, Config, ConfigError


def test_presets_match_reference_numbers():
    c7 = Config.from_name("internlm-chat-7b")
    assert (c7.hidden_size, c7.intermediate_size, c7.num_layers, c7.num_heads, c7.head_dim) == (4096, 11008, 32, 32, 128)
    assert c7.bias and c7.max_position_embeddings == 2048 and c7.rms_norm_eps == 1e-6 and c7.vocab_size == 103168
    c20 = Config.from_name("internlm-20b")
    # not the MindFormers yaml's num_heads 60 / eps 1e-5
    assert (c20.hidden_size, c20.intermediate_size, c20.num_layers, c20.num_heads, c20.head_dim) == (5120, 13824, 60, 40, 128)
    assert not c20.bias and c20.max_position_embeddings == 4096 and c20.rms_norm_eps == 1e-6
    assert c20.rope_scaling == "dynamic"
    assert 6.5e9 < c7.num_parameters() < 7.5e9
    assert 19e9 < c20.num_parameters() < 21e9


def test_overrides_and_unknown_preset():
    assert Config.from_name("internlm-7b", num_layers=2).num_layers == 2
    with pytest.raises(ConfigError, match="unknown preset 'internlm-13b'"):
        Config.from_name("internlm-13b")
    with pytest.raises(ConfigError, match="divisible"):
        Config.from_name("tiny", num_heads=3)
    with pytest.raises(ConfigError, match="dtype"):
        Config.from_name("tiny", dtype="int8")


def test_hf_config_round_trip(tmp_path):
    for name in PRESETS:
        cfg = Config.from_name(name)
        back = Config.from_hf_config(cfg.to_hf_config())
        assert back.replace(name=name) == cfg
    path = tmp_path / "config.json"
    path.write_text(json.dumps(Config.from_name("tiny").to_hf_config()))
    assert Config.from_file(path).hidden_size == 64


def test_saved_checkpoint_config(tmp_path):
    cfg = Config.from_name("tiny-20b")
    cfg.save(tmp_path)
    assert Config.from_checkpoint(tmp_path) == cfg
    with pytest.raises(ConfigError, match="no config.json"):
        Config.from_checkpoint(tmp_path / "nowhere")


def test_hf_config_missing_key():
    hf = Config.from_name("tiny").to_hf_config()
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        Config.from_hf_config(hf)


def test_the_family_comes_from_model_type_and_architectures_and_unknown_ones_are_refused():
    v1, v2 = Config.from_name("tiny").to_hf_config(), Config.from_name("tiny-v2").to_hf_config()
    assert Config.from_hf_config(v2).family == "internlm2" and Config.from_hf_config(v1).family == "internlm"
    llama = {**v1, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert Config.from_hf_config(llama).family == "internlm"  # LLaMA's layout is v1's
    only_arch = {k: v for k, v in v2.items() if k != "model_type"}
    assert Config.from_hf_config(only_arch).family == "internlm2"
    for change, msg in [({"model_type": "internlm4", "architectures": ["InternLM4ForCausalLM"]},
                         "model_type 'internlm4' is not a model this project knows"),
                        ({"model_type": "qwen2"}, "model_type 'qwen2'"),
                        ({"model_type": "internlm3"}, "name different models"),
                        ({"architectures": ["Qwen2ForCausalLM"]}, r"architectures \['Qwen2ForCausalLM'\]"),
                        ({"architectures": ["InternLMForCausalLM"]}, "name different models"),
                        ({"model_type": None, "architectures": None}, "names neither a model_type nor architectures")]:
        hf = {k: v for k, v in {**v2, **change}.items() if v is not None}
        with pytest.raises(ConfigError, match=msg):
            Config.from_hf_config(hf)


def test_internlm3s_published_config_reads_with_its_two_bias_switches_and_head_dim():
    """InternLM3-8B-Instruct's config.json (the numbers as published) reads as the preset, and its
    two bias switches stay apart: qkv_bias for q/k/v, bias for o and the MLP."""
    published = {"architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3", "bias": False,
                 "qkv_bias": False, "head_dim": 128, "hidden_size": 4096, "intermediate_size": 10240,
                 "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 48,
                 "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_scaling": {"factor": 6.0, "rope_type": "dynamic"},
                 "rope_theta": 50000000, "tie_word_embeddings": False, "vocab_size": 128512, "bos_token_id": 1,
                 "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "bfloat16"}
    cfg = Config.from_hf_config(published)
    assert cfg.replace(name="internlm3-8b-instruct") == Config.from_name("internlm3-8b-instruct")
    assert (cfg.family, cfg.kv_heads, cfg.head_dim, cfg.rope_base, cfg.rope_scaling_factor) == ("internlm3", 2, 128, 5e7, 6.0)
    assert 8.7e9 < cfg.num_parameters() < 8.9e9  # 8.8B, untied head
    on_qkv = Config.from_hf_config({**published, "qkv_bias": True})
    assert (on_qkv.bias, on_qkv.out_bias, on_qkv.mlp_bias) == (True, False, False)
    on_rest = Config.from_hf_config({**published, "bias": True})
    assert (on_rest.bias, on_rest.out_bias, on_rest.mlp_bias) == (False, True, True)
    assert "model.layers.0.feed_forward.w2.bias" in on_rest.param_shapes()
    assert "model.layers.0.attention.wq.bias" not in on_rest.param_shapes()
    narrow = Config.from_hf_config({**published, "head_dim": 64})  # head_dim is not hidden / heads
    assert narrow.param_shapes()["model.layers.0.attention.wq.weight"] == (32 * 64, 4096)
    assert narrow.param_shapes()["model.layers.0.attention.wo.weight"] == (4096, 32 * 64)
    for name in ("internlm3-8b-instruct", "tiny-v3"):
        assert Config.from_hf_config(Config.from_name(name).to_hf_config()).replace(name=name) == Config.from_name(name)


def test_what_a_family_cannot_hold_is_refused():
    with pytest.raises(ConfigError, match="grouped-query attention is not part of the internlm family"):
        Config.from_name("tiny", num_kv_heads=2)
    v1 = Config.from_name("tiny").to_hf_config()
    with pytest.raises(ConfigError, match="grouped-query attention is not part of the internlm family"):
        Config.from_hf_config({**v1, "num_key_value_heads": 2})
    with pytest.raises(ConfigError, match="only be written as InternLM3"):
        Config.from_name("tiny", mlp_bias=True).to_hf_config()
    with pytest.raises(ConfigError, match="one switch"):
        Config.from_name("tiny-v3", o_bias=True).to_hf_config()
    with pytest.raises(ConfigError, match="head_dim must be an integer"):
        Config.from_hf_config({**Config.from_name("tiny-v3").to_hf_config(), "head_dim": "16"})
