"""Sizing a served model before loading it: the defaults cut to the memory available, explicit
settings kept or refused with the flags that fit, a model that cannot fit refused with numbers."""
import subprocess
import sys

import pytest

from internlm_core.config import Config
from internlm_core.memory import (DEFAULT_MAX_LEN, DEFAULT_SLOTS, MARGIN, MIN_LEN, RUNTIME_BYTES, available_memory,
                                  cache_bytes, plan_serving, weight_bytes)

GIB = 2 ** 30
V2_1_8B = Config.from_name("internlm2-1_8b")  # 32768 positions, 8 k/v heads of 128


def fits(cfg, plan, available, dtype="float32"):
    return weight_bytes(cfg, dtype) + RUNTIME_BYTES + plan.cache_bytes <= available * MARGIN


def test_the_defaults_when_they_fit():
    cfg = Config.from_name("bench-serve")  # 2048 positions
    plan = plan_serving(cfg, "float32", "float32", 20 * GIB)
    assert (plan.max_batch, plan.max_len) == (DEFAULT_SLOTS, 2048) and "the defaults fit" in plan.reason
    assert plan.cache_bytes == cache_bytes(cfg, DEFAULT_SLOTS, 2048, "float32")
    assert plan_serving(cfg, "float32", "float32", None).max_batch == DEFAULT_SLOTS  # unknown: nothing cut


def test_slots_are_cut_first_then_positions():
    """The issue's case: InternLM2-1.8B with fp32 weights (7.6 GB) and an fp32 cache (192 KiB a
    position) on a 24 GB machine: 8 slots x 4096 positions (6.8 GiB) do not fit beside the weights."""
    available = 12 * GIB
    plan = plan_serving(V2_1_8B, "float32", "float32", available)
    assert plan.max_len == DEFAULT_MAX_LEN and 1 <= plan.max_batch < DEFAULT_SLOTS
    assert fits(V2_1_8B, plan, available)
    assert not fits(V2_1_8B, plan_serving(V2_1_8B, "float32", "float32", 40 * GIB, plan.max_batch + 1,
                                          DEFAULT_MAX_LEN), available)
    assert "cut from 8 slots x 4096 positions" in plan.reason and "--max-batch / --max-len" in plan.reason
    # halved weights leave room for more slots
    assert plan_serving(V2_1_8B, "bfloat16", "float32", available).max_batch > plan.max_batch
    # so little room that one slot of 4096 positions does not fit: the positions shrink
    tight = weight_bytes(V2_1_8B, "float32") + RUNTIME_BYTES + cache_bytes(V2_1_8B, 1, 1024, "float32")
    plan = plan_serving(V2_1_8B, "float32", "float32", int(tight / MARGIN) + 1)
    assert plan.max_batch == 1 and MIN_LEN <= plan.max_len < DEFAULT_MAX_LEN and plan.max_len == 1024


def test_explicit_settings_are_kept_or_refused_with_the_flags_that_fit():
    plan = plan_serving(V2_1_8B, "bfloat16", "float32", 20 * GIB, max_batch=2, max_len=8192)
    assert (plan.max_batch, plan.max_len, plan.reason) == (2, 8192, "as asked")
    with pytest.raises(MemoryError, match=r"8 slots x 32768 positions needs .* lower --max-batch \(at most \d+ at "
                                          r"32768 positions\) or --max-len"):
        plan_serving(V2_1_8B, "bfloat16", "float32", 20 * GIB, max_batch=8, max_len=32768)
    with pytest.raises(MemoryError, match="one slot of 200000 positions needs .* lower --max-len"):
        plan_serving(V2_1_8B, "bfloat16", "float32", 20 * GIB, max_len=200000)
    assert plan_serving(V2_1_8B, "bfloat16", "float32", 20 * GIB, max_batch=3).max_batch == 3


def test_a_draft_model_counts_its_weights_and_its_cache_of_the_same_slots():
    """InternLM2.5-7B (bf16) served with an InternLM2-1.8B draft (bf16): both weights, and both KV
    caches of the plan's slots and positions, fit; the draft's share costs slots, or is refused."""
    target = Config.from_name("internlm2_5-7b-chat")
    available = 26 * GIB
    alone = plan_serving(target, "bfloat16", "float16", available)
    plan = plan_serving(target, "bfloat16", "float16", available, draft=(V2_1_8B, "bfloat16"))
    assert plan.weight_bytes == weight_bytes(target, "bfloat16") + weight_bytes(V2_1_8B, "bfloat16")
    assert plan.cache_bytes == (cache_bytes(target, plan.max_batch, plan.max_len, "float16")
                                + cache_bytes(V2_1_8B, plan.max_batch, plan.max_len, "float16"))
    assert plan.weight_bytes + RUNTIME_BYTES + plan.cache_bytes <= available * MARGIN
    assert plan.max_batch < alone.max_batch
    with pytest.raises(MemoryError, match="with the draft model"):
        plan_serving(target, "bfloat16", "float16", 18 * GIB, draft=(V2_1_8B, "bfloat16"))
    assert plan_serving(target, "bfloat16", "float16", 18 * GIB).max_batch >= 1  # fits alone


def test_a_draft_with_fewer_positions_cuts_the_default_and_refuses_more():
    """A draft of 2048 trained positions (InternLM-7B's shape, no dynamic NTK) beside a target of
    32k: the default positions are cut to the draft's, with the reason; --max-len past them is
    refused by name, before anything loads; a dynamic-NTK draft (InternLM2) cuts nothing."""
    target, short = Config.from_name("internlm2_5-7b-chat"), Config.from_name("internlm-7b")
    assert short.position_limit == 2048 and V2_1_8B.position_limit is None
    for available in (None, 64 * GIB):
        plan = plan_serving(target, "bfloat16", "float16", available, draft=(short, "bfloat16"))
        assert plan.max_len == 2048 and "positions cut to the draft model's 2048" in plan.reason
    assert plan_serving(target, "bfloat16", "float16", 64 * GIB, max_len=2048, draft=(short, "bfloat16")).max_len == 2048
    for batch in (None, 2):
        with pytest.raises(ValueError, match="--max-len 4096 exceeds the draft model's 2048 positions"):
            plan_serving(target, "bfloat16", "float16", 64 * GIB, batch, 4096, draft=(short, "bfloat16"))
    plan = plan_serving(target, "bfloat16", "float16", 64 * GIB, draft=(V2_1_8B, "bfloat16"))
    assert plan.max_len == DEFAULT_MAX_LEN and "cut to the draft" not in plan.reason


def test_a_model_that_cannot_fit_is_refused_before_loading_with_its_numbers():
    cfg = Config.from_name("internlm2_5-7b-chat")  # 7.7 B parameters: 31 GB as float32
    with pytest.raises(MemoryError, match=r"cannot be served here: its weights take 28.8 GiB as float32, .* only "
                                          r"22.0 GiB .*int4 weights, --quantize int4, would take about a sixth"):
        plan_serving(cfg, "float32", "float32", 22 * GIB)
    assert plan_serving(cfg, "bfloat16", "float32", 22 * GIB).max_batch >= 1  # 14.4 GiB as stored


def test_int4_serves_a_20b_model_where_int8_cannot_fit():
    """InternLM2-20B's weights: int8 a byte a linear weight (+ a scale a row), int4 half a byte (+
    a scale per 32), the bf16 embedding and the rest as stored: on 22 GiB int8 is refused before
    loading and int4 fits with its cache."""
    cfg = Config.from_name("internlm2-chat-20b")
    f32, q8, q4 = (weight_bytes(cfg, d) for d in ("float32", "int8", "int4"))
    assert 0.15 < q4 / f32 < 0.18 and 0.55 < q4 / q8 < 0.65
    with pytest.raises(MemoryError, match="as int8"):
        plan_serving(cfg, "int8", "float16", 22 * GIB)
    assert plan_serving(cfg, "int4", "float16", 22 * GIB).max_batch >= 1


def test_available_memory_takes_the_operators_cap(monkeypatch):
    free = available_memory()
    assert free is not None and free > 0
    monkeypatch.setenv("INTERNLM_MEMORY_LIMIT", "1.5G")
    assert available_memory() == min(free, int(1.5 * GIB))
    monkeypatch.setenv("INTERNLM_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="INTERNLM_MEMORY_LIMIT must be a number of bytes"):
        available_memory()


def test_the_planner_needs_no_mindspore():
    code = ("import sys; sys.modules['mindspore'] = None\n"
            "from internlm_core.memory import plan_serving\nfrom internlm_core.config import Config\n"
            "print(plan_serving(Config.from_name('tiny'), 'float32', 'float32', 2**34).max_batch)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "8", out.stderr


def test_workers_started_together_each_get_a_share(monkeypatch):
    """The launcher's N workers would each plan with all the memory available at their start: each
    gets 1/N of it, unless the operator set a limit."""
    from services.launcher import memory_shares

    monkeypatch.delenv("INTERNLM_MEMORY_LIMIT", raising=False)
    assert memory_shares(1) == {}
    share = int(memory_shares(2)["INTERNLM_MEMORY_LIMIT"])
    assert abs(share - available_memory() / 2) < 256 << 20  # what is free moves a little meanwhile
    monkeypatch.setenv("INTERNLM_MEMORY_LIMIT", "4G")
    assert memory_shares(3) == {}


def test_what_a_fine_tune_or_a_conversion_holds_at_least():
    """A full fine-tune: 16 bytes a parameter (fp32 master weights, gradients, AdamW's two moments)
    plus the runtime; LoRA: the base as computed; a conversion: its largest tensor three times as fp32."""
    from internlm_core.errors import TooLarge
    from internlm_core.memory import conversion_bytes, require_fits, training_bytes, weight_bytes

    cfg = Config.from_name("internlm-7b")
    n = cfg.num_parameters()
    assert training_bytes(cfg, "full") == 16 * n + RUNTIME_BYTES
    assert training_bytes(cfg, "full", "bfloat16") == 16 * n + RUNTIME_BYTES  # half copy + half grads: the same
    assert training_bytes(cfg, "lora") == 4 * n + RUNTIME_BYTES
    assert training_bytes(cfg, "lora", "bfloat16") == 2 * n + RUNTIME_BYTES
    # LoRA's frozen base held in its own precision on the training kernels: a bf16 folder's as bf16,
    # int8 (quantize) as its linears' bytes and scales (the rest bf16)
    bf16 = cfg.replace(dtype="bfloat16")
    assert training_bytes(bf16, "lora") == 2 * n + RUNTIME_BYTES
    assert training_bytes(bf16, "lora", quantize="int8") == weight_bytes(bf16, "int8") + RUNTIME_BYTES < 1.2 * n
    assert training_bytes(bf16, "full", quantize=None) == 16 * n + RUNTIME_BYTES
    assert conversion_bytes(cfg) == 103168 * 4096 * 4 * 3  # the embedding (and the head)
    require_fits("x", 10 * GIB, None)  # unknown: passes
    require_fits("x", 10 * GIB, 10 * GIB)
    with pytest.raises(TooLarge, match=r"^a full fine-tune needs at least 109.9 GiB of memory, but 24.0 GiB is "
                                       r"available here$"):
        require_fits("a full fine-tune", training_bytes(cfg, "full"), 24 * GIB)
