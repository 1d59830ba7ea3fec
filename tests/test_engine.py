"""The KV-cache engine: cached decoding equals full recomputation, and greedy generation
equals HF transformers' for single prompts and batches of different lengths."""
import numpy as np
import pytest
import torch

from internlm_core.engine import Engine
from internlm_core.errors import PromptTooLong
from internlm_core.generation import SamplingParams, generate, generate_batch
from internlm_core.loader import load_model
from internlm_core.model import forward_inputs
from tests.helpers import hf_greedy, random_ids

GREEDY = SamplingParams(max_new_tokens=32, stop_token_ids=[])


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The same weights never handed to an Engine: unfused, unpacked, MindSpore's own ops, so a
    kernel bug cannot cancel out of a comparison with it."""
    ref = load_model(tiny_model_dir)
    assert not ref.fused and ref.ops.name == "mindspore"
    return ref


@pytest.fixture(scope="module")
def engine(model):
    """An fp32 KV cache: logits compared with HF's and a cache-free forward's to fp32 rounding."""
    return Engine(model, max_batch=4, max_len=128, cache_dtype="float32")


@pytest.fixture(scope="module")
def half_engine(model):
    """The default KV cache (float16 on the CPU kernels): greedy tokens compared."""
    return Engine(model, max_batch=4, max_len=128)


def test_cached_decode_equals_full_recompute(reference, engine):
    ids = random_ids(40, 512, seed=1)
    full = reference(*forward_inputs(reference.config, np.array([ids]))).asnumpy()[0]
    # The cached path's attention (the CPU kernels' online softmax) sums in another order than the
    # uncached forward's: float32 rounding, a few ulps of logits of order 1.
    logits = engine.prefill([2], [ids[:10]])[0]
    np.testing.assert_allclose(logits, full[9], rtol=1e-5, atol=1e-5)
    tokens = np.zeros(4, np.int32)
    positions = np.zeros(4, np.int64)
    for t in range(10, 40):
        tokens[2], positions[2] = ids[t], t
        logits = engine.decode(tokens, positions)[2]
        np.testing.assert_allclose(logits, full[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["float32", "default"])
def test_greedy_32_tokens_identical_to_hf(tiny_hf, engine, half_engine, cache):
    engine = engine if cache == "float32" else half_engine
    prompt = random_ids(13, 512, seed=5)
    ours = [e.token_id for e in generate(engine, prompt, GREEDY)]
    assert ours == hf_greedy(tiny_hf[0], prompt)


@pytest.mark.parametrize("cache", ["float32", "default"])
def test_batch_of_different_lengths(tiny_hf, engine, half_engine, cache):
    engine = engine if cache == "float32" else half_engine
    prompts = [random_ids(n, 512, seed=n) for n in (3, 29, 11, 17)]
    results = generate_batch(engine, prompts, GREEDY)
    for p, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(tiny_hf[0], p), f"prompt of {len(p)} tokens"
        assert r.finish_reason == "length" and r.prompt_tokens == len(p)


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=16, stop_token_ids=[], logprobs=True),
    SamplingParams(max_new_tokens=16, stop_token_ids=[], logprobs=True, temperature=0.9, top_k=20, seed=3),
], ids=["greedy", "sampled"])
def test_logprobs_equal_hf_log_softmax(tiny_hf, engine, params):
    """Each token's logprob is log-softmax of the model's own logits (before any sampling
    filter), as HF computes it for the same tokens in one forward pass."""
    prompt = random_ids(9, 256, seed=21)
    r = generate_batch(engine, [prompt], params)[0]
    with torch.no_grad():
        logits = tiny_hf[0](torch.tensor([prompt + r.token_ids])).logits[0].double()
    ref = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(r.token_ids)[:, None])[:, 0]
    assert len(r.logprobs) == 16
    np.testing.assert_allclose(r.logprobs, ref.numpy(), atol=1e-4, rtol=0)


def test_top_logprobs_equal_hf_top_k(tiny_hf, engine):
    """``top_logprobs``: at each step the k most likely tokens of HF's log-softmax, most likely first
    (torch.topk), sampled or not; the chosen token's logprob comes with them."""
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[], top_logprobs=5, temperature=0.8, seed=4)
    prompt = random_ids(7, 256, seed=22)
    events = list(generate(engine, prompt, params))
    with torch.no_grad():
        logits = tiny_hf[0](torch.tensor([prompt + [e.token_id for e in events]])).logits[0].double()
    ref = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].topk(5, -1)
    for e, values, ids in zip(events, ref.values, ref.indices, strict=True):
        assert [i for i, _ in e.top_logprobs] == ids.tolist()
        np.testing.assert_allclose([lp for _, lp in e.top_logprobs], values.numpy(), atol=1e-4, rtol=0)
        assert e.logprob is not None


def test_slots_are_independent(engine):
    """A sequence's tokens do not depend on what the other slots hold."""
    p = random_ids(9, 512, seed=9)
    alone = [e.token_id for e in generate(engine, p, GREEDY, slot=0)]
    crowded = generate_batch(engine, [random_ids(20, 512, seed=2), p, random_ids(4, 512, seed=3)], GREEDY)
    assert crowded[1].token_ids == alone


def test_prompt_limits(engine):
    with pytest.raises(ValueError, match="empty prompt") as empty:
        engine.prefill([0], [[]])
    assert not isinstance(empty.value, PromptTooLong)  # nothing is too long about it
    with pytest.raises(PromptTooLong, match="128 positions"):
        list(generate(engine, random_ids(200, 512), GREEDY))


def test_generation_stops_at_cache_end(engine):
    res = generate_batch(engine, [random_ids(120, 512)], SamplingParams(max_new_tokens=50, stop_token_ids=[]))[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 8


def test_chunked_prefill_of_long_prompts_equals_full_recompute():
    """Prompts past PREFILL_CHUNK are prefilled chunk by chunk against the cache; the logits and
    the following cached decode steps equal a cache-free forward over the whole sequence."""
    from internlm_core.config import Config
    from internlm_core.engine import PREFILL_CHUNK
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name("tiny", max_position_embeddings=400)
    model, reference = InternLMForCausalLM(cfg), InternLMForCausalLM(cfg)  # the reference stays unpacked
    init_weights(model, seed=2, std=0.2)
    init_weights(reference, seed=2, std=0.2)
    eng = Engine(model, max_batch=3, max_len=330, cache_dtype="float32")
    seqs = [random_ids(n, 512, seed=n) for n in (310, PREFILL_CHUNK + 2, 20)]
    lengths = [300, PREFILL_CHUNK + 1, 12]
    logits = eng.prefill([2, 0, 1], [s[:n] for s, n in zip(seqs, lengths)])
    for row, (s, n) in enumerate(zip(seqs, lengths)):
        full = reference(*forward_inputs(cfg, np.array([s]))).asnumpy()[0]
        np.testing.assert_allclose(logits[row], full[n - 1], atol=1e-4)
    # decode one more token in every slot and compare with the full forward
    tokens = np.array([seqs[1][lengths[1]], seqs[2][lengths[2]], seqs[0][lengths[0]]], np.int32)
    positions = np.array([lengths[1], lengths[2], lengths[0]])
    step = eng.decode(tokens, positions)
    for slot, row in ((0, 1), (1, 2), (2, 0)):
        full = reference(*forward_inputs(cfg, np.array([seqs[row]]))).asnumpy()[0]
        np.testing.assert_allclose(step[slot], full[lengths[row]], atol=1e-4)


@pytest.mark.parametrize("cpu_kernels,native", [(True, True), (True, False), (False, False)],
                         ids=["native", "kernels-graph", "mindspore-ops"])
def test_live_rows_and_cache_buckets_equal_full_recompute(model, reference, tiny_model_dir, monkeypatch, cpu_kernels,
                                                          native):
    """Decode of a few live slots gives the logits of a full forward as sequences grow, and a step
    never runs the slots that are idle; with MindSpore's ops a step attends a power-of-two prefix
    of the cache and sequences cross those buckets (the smallest attended length lowered to 32 so
    that 32, 64 and 128 all occur in the tiny model's 128 positions), with the CPU kernels each
    row reads its own positions and decode has one shape per rows bucket; the native step
    (``kernels.DecodeStep``) runs exactly the live rows and compiles no decode shape."""
    import internlm_core.engine as engine_mod

    monkeypatch.setattr(engine_mod, "MIN_ATTEND", 32)
    cfg = model.config
    eng = Engine(model, max_batch=8, max_len=128, cpu_kernels=cpu_kernels, cache_dtype="float32", native_step=native)
    assert (eng._native is not None) == native
    assert eng.kernels == cpu_kernels
    seqs = {1: random_ids(120, 512, seed=7), 6: random_ids(70, 512, seed=8)}
    full = {s: reference(*forward_inputs(cfg, np.array([ids]))).asnumpy()[0] for s, ids in seqs.items()}
    starts = {1: 20, 6: 9}
    logits = eng.prefill(list(seqs), [seqs[s][:starts[s]] for s in seqs])
    for row, s in zip(logits, seqs):
        np.testing.assert_allclose(row, full[s][starts[s] - 1], atol=1e-4)
    for step in range(100):
        live = [s for s in seqs if starts[s] + step < len(seqs[s])]
        pos = [starts[s] + step for s in live]
        out = eng.decode([seqs[s][p] for s, p in zip(live, pos)], pos, slots=live)
        assert out.shape == (len(live), cfg.vocab_size)
        for row, s, p in zip(out, live, pos):
            np.testing.assert_allclose(row, full[s][p], atol=1e-4)
    decode_attended = {a for b, t, a in eng.shapes_run if t == 1}
    assert decode_attended == (set() if native else {0} if cpu_kernels else {32, 64, 128})
    assert {b for b, t, a in eng.shapes_run} == ({2} if native else {2, 1})  # never the 8 allocated slots


def test_steps_reuse_their_compiled_shapes(model):
    """After a warm-up generation, the same traffic feeds the compiled step no new shape: every
    step reuses one of a few (rows, tokens, attended) graphs instead of compiling per step."""
    eng = Engine(model, max_batch=4, max_len=128)
    prompts = [random_ids(n, 512, seed=n) for n in (5, 17, 40)]
    generate_batch(eng, prompts, GREEDY)
    warmed = set(eng.shapes_run)
    assert len(warmed) <= 6
    again = generate_batch(eng, prompts, GREEDY)
    assert eng.shapes_run == warmed
    assert [r.token_ids for r in again] == [r.token_ids for r in generate_batch(eng, prompts, GREEDY)]


def test_cache_bytes_reported(model):
    """The default cache on the kernels is float16, half an fp32 one's bytes; float32 on request."""
    cfg = model.config
    for cache, size in (("float32", 4), (None, 2), ("float16", 2)):
        eng = Engine(model, max_batch=4, max_len=128, cache_dtype=cache)
        assert eng.kernels and eng.cache_dtype == (cache or "float16")
        assert eng.cache_bytes_per_slot == 2 * cfg.num_layers * 128 * cfg.hidden_size * size
        assert eng.cache_bytes == 5 * eng.cache_bytes_per_slot  # the slots and the scratch slot
        assert sum(c.nbytes for c in eng.caches) == eng.cache_bytes
    with pytest.raises(ValueError, match="float32 or float16"):
        Engine(model, max_batch=1, max_len=128, cache_dtype="bfloat16")


def test_serving_dtypes_name_the_cache_the_engine_will_hold(model):
    """What the worker's memory plan counts: the default cache dtype where the kernels serve is the
    one ``Engine`` allocates (float16), float32 when asked; anything else refused."""
    from internlm_core.engine import serving_dtypes

    cfg = model.config
    assert serving_dtypes(cfg) == ("float32", "float16")
    assert serving_dtypes(cfg.replace(dtype="bfloat16")) == ("bfloat16", "float16")
    assert serving_dtypes(cfg, cache_dtype="float32") == ("float32", "float32")
    assert serving_dtypes(cfg, "int8") == ("int8", "float16")  # quantised at load
    assert Engine(model, max_batch=1, max_len=64).cache_dtype == serving_dtypes(cfg)[1]
    with pytest.raises(ValueError, match="float32 or float16"):
        serving_dtypes(cfg, cache_dtype="int8")


def test_an_engine_serves_its_own_form_and_leaves_the_model_it_is_given_as_it_was(tiny_model_dir):
    """The engine decides the serving form once and builds it beside the model it is given (fused
    and, on the kernels, packed weights new, the others shared): that model keeps its form and
    weights, so a second engine or a reference forward on it computes what it did. A model whose
    weights are packed for the kernels cannot be served on MindSpore's ops, and says so."""
    from internlm_core.loader import load_serving_model

    model = load_model(tiny_model_dir)
    before = {n: (tuple(p.shape), p.dtype) for n, p in model.parameters_and_names()}
    eng = Engine(model, max_batch=1, max_len=32)
    assert eng.model is not model and eng.model.fused and not model.fused and model.ops.name == "mindspore"
    assert {n: (tuple(p.shape), p.dtype) for n, p in model.parameters_and_names()} == before
    served = dict(eng.model.parameters_and_names())
    assert served["model.norm_out.weight"] is dict(model.parameters_and_names())["model.norm_out.weight"]
    plain = Engine(model, max_batch=1, max_len=32, cpu_kernels=False)
    assert plain.model.ops.name == "mindspore" and not plain.kernels
    if eng.kernels:
        with pytest.raises(ValueError, match="packed for cpu-kernels: it cannot serve on mindspore"):
            Engine(load_serving_model(tiny_model_dir), cpu_kernels=False)


def test_cache_that_cannot_fit_is_refused_before_allocating(model):
    """A cache larger than the machine's available memory is a clear error, not an OOM kill."""
    from internlm_core.engine import available_memory

    free = available_memory()
    slots = int(free // (2 * model.config.num_layers * 128 * model.config.hidden_size * 4)) + 1
    with pytest.raises(MemoryError, match="lower max_batch or max_len"):
        Engine(model, max_batch=slots, max_len=128, cache_dtype="float32")


def compiles() -> int:
    """Graphs MindSpore has compiled for ms.jit functions in this process (its compile cache)."""
    from mindspore.graph import api

    return len(api.ms_compile_cache)


@pytest.mark.parametrize("native", [True, False], ids=["native", "graph"])
def test_warmup_compiles_every_serving_shape(model, native):
    """After warm-up, decoding any number of live slots at any length, and prefilling up to all
    slots at once with prompts of up to PREFILL_CHUNK tokens, compiles nothing (counted in
    MindSpore's own compile cache, not inferred from shapes). Warm-up itself compiles one graph
    for each shape it reports: a step that ran without ms.jit would compile none. The native
    decode step compiles no decode shape at all."""
    eng = Engine(model, max_batch=4, max_len=128, native_step=native)
    before = compiles()
    shapes = 3 * ((not native) + 3)  # rows 1, 2, 4 x (one graph decode shape + chunks of 32, 64, 128)
    assert eng.warmup() == shapes
    assert compiles() - before == shapes
    before = compiles()
    for n in (1, 2, 3, 4):
        eng.decode(np.ones(n, np.int32), np.full(n, 100), slots=list(range(n)))
        eng.prefill(list(range(n)), [random_ids(k, 512, seed=k) for k in (2, 37, 90, 127)[:n]])
        eng.decode(np.ones(n, np.int32), np.full(n, 127), slots=list(range(n)))
    assert compiles() == before


def test_warmup_covers_long_prompts_and_prefix_starts():
    """With positions past MIN_ATTEND, warm-up also compiles the one-row shapes of chunks further
    in, so long prompts, prompts started mid-way (prefix reuse) and several long prompts at once
    compile nothing later, and their logits equal a full forward's."""
    from internlm_core.config import Config
    from internlm_core.engine import MIN_ATTEND, PREFILL_CHUNK
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name("tiny", max_position_embeddings=4 * MIN_ATTEND)
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=3, std=0.5)
    eng = Engine(model, max_batch=2, max_len=4 * MIN_ATTEND, cache_dtype="float32")
    # with the kernels rows 1, 2 x chunks 32, 64, 128 (decode is the native step's); with MindSpore's
    # ops rows 1, 2 x (decode at attended 128, 256, 512 + chunks) + one row x chunks x (256, 512)
    assert eng.warmup() == (2 * 3 if eng.kernels else 2 * (3 + 3) + 2 * 3)
    before = compiles()
    prompts = [random_ids(n, 512, seed=n) for n in (3 * PREFILL_CHUNK + 5, 2 * PREFILL_CHUNK + 70)]
    logits = list(eng.prefill([0, 1], prompts))
    longer = prompts[0] + random_ids(20, 512, seed=1)  # slot 0 already holds prompts[0]: a prefix hit
    logits += list(eng.prefill([0], [longer], starts=[len(prompts[0])]))
    assert compiles() == before
    for row, ids in zip(logits, prompts + [longer]):
        full = model(*forward_inputs(cfg, np.array([ids]))).asnumpy()[0, -1]
        np.testing.assert_allclose(row, full, atol=1e-4)


@pytest.mark.parametrize("cache", ["float32", None], ids=["fp32-cache", "default-cache"])
def test_dynamic_ntk_while_serving_equals_hf(tmp_path, monkeypatch, cache):
    """The 20B shape (no bias, dynamic NTK) served past its 64 trained positions: a 90-token prompt
    prefilled in chunks next to a short one (with MindSpore's ops, chunks further in than
    MIN_ATTEND one row at a time), then cached decode through the batcher, gives HF's cached
    greedy generation with the same rope scaling, token for token; on an fp32 KV cache and on the
    default one (fp16 on the CPU kernels)."""
    import internlm_core.engine as engine_mod
    from internlm_core.batching import Batcher
    from internlm_core.config import Config
    from internlm_core.convert import hf_to_ms
    from tests.helpers import hf_reference_model, save_hf_folder

    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 32)
    monkeypatch.setattr(engine_mod, "PREFILL_MIN", 8)
    monkeypatch.setattr(engine_mod, "MIN_ATTEND", 32)
    cfg = Config.from_name("tiny-20b")
    ref = hf_reference_model(cfg, seed=3)
    hf_to_ms(save_hf_folder(ref, cfg, tmp_path / "hf"), tmp_path / "ms")
    engine = Engine(load_model(tmp_path / "ms"), max_batch=2, max_len=160, cache_dtype=cache)
    engine.prefill_chunk = 32
    prompts = [random_ids(90, 512, seed=90), random_ids(12, 512, seed=12)]
    params = SamplingParams(max_new_tokens=40, stop_token_ids=[], ignore_eos=True)
    b = Batcher(engine, prefix_cache=False).start()
    try:
        got = [[e.token_id for e in h] for h in [b.submit(p, params) for p in prompts]]
    finally:
        b.stop(timeout=60)
    for p, tokens in zip(prompts, got):
        assert tokens == hf_greedy(ref, p, 40), f"prompt of {len(p)}"
    assert len(prompts[0]) > cfg.max_position_embeddings  # it attends past the trained positions
    assert engine.kernels or any(a > 64 for _, _, a in engine.shapes_run)


def _rounded_folders(tmp_path, preset: str, dtype: str):
    """(a ``dtype`` checkpoint folder, an fp32 folder of the same values): random weights rounded to
    ``dtype`` first, so both files hold exactly the same numbers."""
    from internlm_core.checkpoint import bf16_to_f32, f32_to_bf16
    from internlm_core.config import Config
    from internlm_core.loader import save_model, state_dict
    from internlm_core.model import InternLMForCausalLM, init_weights

    cfg = Config.from_name(preset)
    model = InternLMForCausalLM(cfg)
    init_weights(model, seed=3, std=0.2)
    rounded = {n: bf16_to_f32(f32_to_bf16(w)) if dtype == "bfloat16" else w.astype(np.float16).astype(np.float32)
               for n, w in state_dict(model).items()}
    return (save_model(rounded, cfg, tmp_path / dtype, dtype=dtype),
            save_model(rounded, cfg, tmp_path / "float32", dtype="float32"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-v2"])
def test_half_precision_checkpoint_is_served_in_its_precision(tmp_path, preset, dtype):
    """open_engine holds a bf16 / fp16 checkpoint's linears, head and embedding in that dtype (norms
    and biases fp32) and computes in fp32: logits equal today's fp32 engine on the same values to
    fp32 rounding (1e-4 relative) through prefill, prefill in pieces and batched decode, and greedy
    tokens are identical; with and without bias, grouped-query attention."""
    import mindspore as ms

    from internlm_core.engine import open_engine

    half, full = _rounded_folders(tmp_path, preset, dtype)
    served = open_engine(half, max_batch=3, max_len=64 if preset == "tiny-v2" else 128)
    reference = Engine(load_model(full), max_batch=3, max_len=served.max_len)
    want = ms.bfloat16 if dtype == "bfloat16" else ms.float16
    kinds = {p.name.split(".")[-2] + "." + p.name.split(".")[-1]: p.dtype for p in served.model.get_parameters()
             if not p.name.startswith("kv_cache")}
    for name, dt in kinds.items():
        assert dt == (ms.float32 if "norm" in name or name.endswith(".bias") else want), name
    assert "wqkv.weight" in kinds and "w13.weight" in kinds and "wq.weight" not in kinds

    _agree(served, reference)


def test_fp32_checkpoint_serves_as_before(tiny_model_dir, model):
    """An fp32 folder through open_engine (read straight into the packed form) gives exactly the
    logits of the engine built from ``load_model``'s model (packed after loading), as served before."""
    from internlm_core.engine import open_engine

    served = open_engine(tiny_model_dir, max_batch=2, max_len=128)
    before = Engine(load_model(tiny_model_dir), max_batch=2, max_len=128)
    assert all(p.dtype == model.dtype for p in served.model.get_parameters())
    prompts = [random_ids(9, 512, seed=1), random_ids(30, 512, seed=2)]
    np.testing.assert_array_equal(served.prefill([0, 1], prompts), before.prefill([0, 1], prompts))
    np.testing.assert_array_equal(served.decode([4, 5], [9, 30]), before.decode([4, 5], [9, 30]))


def test_lora_adapter_on_a_bf16_base_equals_the_fp32_base(tmp_path):
    """A LoRA adapter (fp32) served per row on a base held in bf16 gives the logits of the same
    adapter on the fp32 engine with the same base values (1e-4 relative)."""
    from internlm_core.config import Config
    from internlm_core.engine import open_engine
    from internlm_core.lora import AdapterSpec
    from tests.helpers import random_adapter

    half, full = _rounded_folders(tmp_path, "tiny", "bfloat16")
    adapter = random_adapter(Config.from_name("tiny"), AdapterSpec(rank=4, alpha=8, targets=("wq", "wv", "w2")),
                             tmp_path / "a", 1)
    served, reference = open_engine(half, max_batch=2, max_len=64), Engine(load_model(full), max_batch=2, max_len=64)
    for eng in (served, reference):
        assert eng.load_adapter("a", adapter) == 1
    prompts, rows = [random_ids(7, 512, seed=1), random_ids(12, 512, seed=2)], np.array([1, 0])
    for a, b in ((served.prefill([0, 1], prompts, rows), reference.prefill([0, 1], prompts, rows)),
                 (served.decode([3, 4], [7, 12], rows), reference.decode([3, 4], [7, 12], rows))):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


@pytest.fixture(scope="module")
def int8_folders(tmp_path_factory):
    """(a bf16 MindSpore folder, the int8 folder ``internlm convert --quantize int8`` makes of the
    same HF checkpoint): the tiny shape, with biases; the int4 one beside them, as ``q4``."""
    from internlm_core.config import Config
    from internlm_core.convert import hf_to_ms
    from tests.helpers import hf_reference_model, save_hf_folder

    cfg = Config.from_name("tiny")
    root = tmp_path_factory.mktemp("int8")
    hf = save_hf_folder(hf_reference_model(cfg, seed=3), cfg, root / "hf", dtype="bfloat16")
    hf_to_ms(hf, root / "bf16")
    hf_to_ms(hf, root / "q8", quantize="int8")
    hf_to_ms(hf, root / "q4", quantize="int4")
    return root / "bf16", root / "q8"


def _close(a, b):
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def reference_engine(folder, **kw) -> Engine:
    """What a quantised folder's engine is compared with: the fp32 engine on its dequantised weights
    (``load_model`` widens q * scale); for int4 where the kernel rounds the activations too (W4A8,
    ``kernels.int4_activations``), each linear's input rounded first as the kernel rounds it
    (``Q8Activations``), so the two differ by float rounding only (without it, by ~3% of the largest
    logit on the tiny model: the activations' rounding, which the kernel tests pin down exactly)."""
    from internlm_core import kernels

    model = load_model(folder)
    if model.config.quantization == "int4" and kernels.int4_activations() == "int8":
        model = model.serving_form(_q8_activations())
    return Engine(model, **kw)


def _q8_activations():
    """The serving kernels, each packed linear's input first rounded by llama.cpp's Q8_0 rule, as the
    W4A8 int4 kernel rounds it (tests/test_kernels.py's ``q8_0``: per row and group of 32,
    d = max|x| / 127, x * (1 / d) rounded to nearest, ties to even), then multiplied back by d."""
    import mindspore as ms
    from mindspore import ops

    from internlm_core.forms import ServingKernels
    from internlm_core.quantize import GROUP

    @ms.jit_class
    class Q8Activations(ServingKernels):
        def linear(self, x, w, b, scale, trains):
            g = x.reshape(x.shape[:-1] + (x.shape[-1] // GROUP, GROUP))
            d = g.abs().max(axis=-1, keepdims=True) / 127.0
            inv = ops.where(d != 0, 1.0 / d, ops.zeros_like(d))
            x = (ops.round(g * inv) * d).reshape(x.shape)
            return self.packed[0](x, w) if b is None else self.packed[1](x, w, b)

    return Q8Activations()


def _agree(served, reference):
    """``served`` and ``reference`` (3 slots) give the same logits (1e-4 relative) on a prefill, four
    decode steps and a prompt fed in two pieces (the second attending the cache), and the same
    greedy tokens."""
    prompts = [random_ids(n, 512, seed=n) for n in (5, 40, 17)]
    slots = [0, 1, 2]
    _close(served.prefill(slots, prompts), reference.prefill(slots, prompts))
    tokens, positions = np.array([3, 7, 11]), np.array([len(p) for p in prompts])
    for _ in range(4):
        _close(served.decode(tokens, positions), reference.decode(tokens, positions))
        positions += 1
    for eng in (served, reference):
        eng.prefill(slots, prompts, ends=[2, 21, 9])
    _close(served.prefill(slots, prompts, starts=[2, 21, 9]), reference.prefill(slots, prompts, starts=[2, 21, 9]))
    params = SamplingParams(max_new_tokens=16, stop_token_ids=[])
    assert ([r.token_ids for r in generate_batch(served, prompts, params)]
            == [r.token_ids for r in generate_batch(reference, prompts, params)])


@pytest.mark.parametrize("method,folder,stored", [("int8", "q8", "I8"), ("int4", "q4", "U8")])
def test_a_quantised_folder_is_served_quantised_in_one_copy(int8_folders, method, folder, stored):
    """An int8 (int4) folder's linears and head are held as packed int8 (pairs of int4 in uint8,
    half a byte a weight) + fp32 scales a row (a row's group of 32) and nothing else: the served
    parameters' bytes are those, the bf16 embedding table, fp32 norms and biases. They give the
    logits of the fp32 engine on the dequantised weights (1e-4 relative) through prefill, prefill in
    pieces and batched decode, with identical greedy tokens."""
    import mindspore as ms

    from internlm_core.checkpoint import SafetensorsFile
    from internlm_core.engine import open_engine, serving_dtypes
    from internlm_core.quantize import SCHEMES, quantized_names

    q = int8_folders[0].parent / folder
    served = open_engine(q, max_batch=3, max_len=128)
    reference = reference_engine(q, max_batch=3, max_len=128)
    cfg = served.config
    assert serving_dtypes(cfg) == (method, "float16") and served.quantization == method
    params = {p.name: p for p in served.model.get_parameters() if not p.name.startswith("kv_cache")}
    for name, p in params.items():
        leaf = name.rsplit(".", 1)[1]
        want = {"weight_scale": ms.float32, "bias": ms.float32, "embedding_weight": ms.bfloat16}.get(leaf)
        if leaf == "weight":
            want = ms.float32 if "norm" in name else {"int8": ms.int8, "int4": ms.uint8}[method]
        assert p.dtype == want, name
    assert any(n.endswith("lm_head.weight_scale") for n in params)
    assert any(n.endswith("model.layers.0.attention.wqkv.weight_scale") for n in params)
    shapes, scheme, quantized = cfg.param_shapes(), SCHEMES[method], quantized_names(cfg)
    want_bytes = sum(r * c // scheme.per_byte + 4 * r * scheme.groups(c) for r, c in (shapes[n] for n in quantized))
    want_bytes += sum(4 * int(np.prod(s)) for n, s in shapes.items() if n not in quantized and "embedding" not in n)
    want_bytes += 2 * cfg.vocab_size * cfg.hidden_size
    assert sum(p.nbytes for p in params.values()) == want_bytes == served.weight_bytes
    assert SafetensorsFile(q / "model.safetensors").info("lm_head.weight")[0] == stored
    _agree(served, reference)


@pytest.mark.parametrize("method,folder,held", [("int8", "q8", np.int8), ("int4", "q4", np.uint8)])
def test_bf16_folder_quantised_at_load_equals_the_quantised_folder(int8_folders, method, folder, held):
    """``quantize="int8"`` (or int4) on a bf16 folder quantises it while loading into exactly the
    folder ``internlm convert --quantize`` makes: the same packed integers and scales, bit-identical
    logits; serving_dtypes counts it as quantised for the worker's memory plan."""
    from internlm_core.engine import open_engine, serving_dtypes

    bf16, stored_dir = int8_folders[0], int8_folders[0].parent / folder
    at_load = open_engine(bf16, max_batch=2, max_len=64, quantize=method)
    stored = open_engine(stored_dir, max_batch=2, max_len=64)
    assert at_load.quantization == stored.quantization == method
    assert serving_dtypes(at_load.config) == ("bfloat16", "float16")
    assert serving_dtypes(at_load.config, method) == (method, "float16")
    ours = {p.name: p.asnumpy() for p in at_load.model.get_parameters() if "weight" in p.name and "embedding" not in p.name}
    theirs = {p.name: p.asnumpy() for p in stored.model.get_parameters() if "weight" in p.name and "embedding" not in p.name}
    assert ours.keys() == theirs.keys() and any(a.dtype == held for a in ours.values())
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    prompts = [random_ids(9, 512, seed=1), random_ids(30, 512, seed=2)]
    np.testing.assert_array_equal(at_load.prefill([0, 1], prompts), stored.prefill([0, 1], prompts))
    np.testing.assert_array_equal(at_load.decode([4, 5], [9, 30]), stored.decode([4, 5], [9, 30]))


@pytest.mark.parametrize("base", ["q8", "q4"])
def test_lora_adapter_on_an_int8_base_equals_the_fp32_base(int8_folders, tmp_path, base):
    """A LoRA adapter (fp32) served per row on an int8 or int4 base gives the logits of the same
    adapter on the fp32 engine with the dequantised base (1e-4 relative)."""
    from internlm_core.config import Config
    from internlm_core.engine import open_engine
    from internlm_core.lora import AdapterSpec
    from tests.helpers import random_adapter

    q = int8_folders[1].parent / base
    adapter = random_adapter(Config.from_name("tiny"), AdapterSpec(rank=4, alpha=8, targets=("wq", "wv", "w2")),
                             tmp_path / "a", 1)
    served = open_engine(q, max_batch=2, max_len=64, cache_dtype="float32")  # logits compared at 1e-4
    reference = reference_engine(q, max_batch=2, max_len=64, cache_dtype="float32")
    for eng in (served, reference):
        assert eng.load_adapter("a", adapter) == 1
    prompts, rows = [random_ids(7, 512, seed=1), random_ids(12, 512, seed=2)], np.array([1, 0])
    for a, b in ((served.prefill([0, 1], prompts, rows), reference.prefill([0, 1], prompts, rows)),
                 (served.decode([3, 4], [7, 12], rows), reference.decode([3, 4], [7, 12], rows))):
        _close(a, b)
