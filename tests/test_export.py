"""MindIR export: the exported prefill/decode pair generates exactly what the eager engine does,
and an exported folder refuses a config, tokenizer or graph that is not its own."""
import json
import shutil

import numpy as np
import pytest

from internlm_core.checkpoint import Cancelled
from internlm_core.config import Config
from internlm_core.engine import Engine, open_engine
from internlm_core.export import MANIFEST_FILE, ExportError, export_mindir
from internlm_core.exported import ExportedEngine, read_manifest
from internlm_core.generation import SamplingParams, generate, generate_batch
from internlm_core.loader import load_model
from tests.helpers import hf_greedy, hf_reference_model, save_hf_folder

MAX_BATCH, MAX_LEN = 4, 64
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    """{"static": folder, "dynamic": folder}, both exported from the tiny model."""
    root = tmp_path_factory.mktemp("export")
    return {kind: export_mindir(tiny_model_dir, root / kind, max_batch=MAX_BATCH, max_len=MAX_LEN,
                                dynamic=kind == "dynamic")
            for kind in ("static", "dynamic")}


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    # the exported graphs hold a float32 cache: the logits are compared at 1e-5 against the same
    return Engine(load_model(tiny_model_dir), max_batch=MAX_BATCH, max_len=MAX_LEN, cache_dtype="float32")


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + [int(x) for x in rng.integers(3, 512, n - 1)] for n in lengths]


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_greedy_generation_matches_eager_at_batch_1_and_4(exports, eager, kind):
    engine = open_engine(exports[kind], max_batch=MAX_BATCH)
    assert isinstance(engine, ExportedEngine)
    batch = prompts([5, 19, 3, 12])
    got = [r.token_ids for r in generate_batch(engine, batch, GREEDY)]
    want = [r.token_ids for r in generate_batch(eager, batch, GREEDY)]
    assert got == want
    assert len({tuple(t) for t in want}) == 4  # distinct continuations: the rows really differ

    single = prompts([9], seed=1)[0]
    got1 = [ev.token_id for ev in generate(engine, single, GREEDY)]
    assert got1 == [ev.token_id for ev in generate(eager, single, GREEDY)]
    assert len(got1) == GREEDY.max_new_tokens


def test_one_slot_engine_on_a_four_slot_static_export(exports, eager):
    """A static export can run fewer slots than it was exported with (the CLI asks for one)."""
    engine = ExportedEngine(exports["static"], max_batch=1, max_len=40)
    assert (engine.max_batch, engine.max_len) == (1, 40)
    p = prompts([7], seed=2)[0]
    assert [e.token_id for e in generate(engine, p, GREEDY)] == [e.token_id for e in generate(eager, p, GREEDY)]


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_prefill_into_free_slots_while_others_decode(exports, eager, kind):
    """The continuous batcher's pattern: new prompts join slots while another slot is mid-sequence."""
    engine = ExportedEngine(exports[kind])
    a, b, c = prompts([6, 11, 4], seed=3)
    tokens, positions = np.zeros(MAX_BATCH, np.int32), np.zeros(MAX_BATCH, np.int64)
    for e in (engine, eager):
        e.prefill([0], [a])
    for step in range(6):
        if step == 3:
            first = [e.prefill([3, 1], [b, c]) for e in (engine, eager)]
            np.testing.assert_allclose(first[0], first[1], rtol=1e-5, atol=1e-5)
        tokens[0], positions[0] = 5 + step, len(a) + step
        if step >= 3:
            tokens[[3, 1]], positions[[3, 1]] = 7, [len(b) + step - 3, len(c) + step - 3]
        got, want = engine.decode(tokens, positions), eager.decode(tokens, positions)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_manifest_describes_graphs(exports, tiny_model_dir, tiny_config):
    m = read_manifest(exports["static"])
    assert m["preset"] == "tiny" and m["config"] == tiny_config.to_dict()
    assert (m["max_batch"], m["max_len"], m["dynamic"]) == (MAX_BATCH, MAX_LEN, False)
    inputs = {i["name"]: i for i in m["graphs"]["prefill"]["inputs"]}
    assert inputs["input_ids"] == {"name": "input_ids", "shape": [1, MAX_LEN], "dtype": "int32"}
    assert inputs["k_cache.1"]["shape"] == [MAX_BATCH, tiny_config.num_heads, MAX_LEN, tiny_config.head_dim]
    assert m["graphs"]["decode"]["outputs"][0]["shape"] == [MAX_BATCH, tiny_config.vocab_size]
    dyn = read_manifest(exports["dynamic"])["graphs"]["decode"]["inputs"]
    assert dyn[0]["shape"] == [None, 1] and dyn[-1]["shape"] == [None, tiny_config.num_heads, None, 16]
    for name in ("config.json", "tokenizer.model"):
        assert (exports["static"] / name).read_bytes() == (tiny_model_dir / name).read_bytes()


@pytest.fixture
def copy_of(exports, tmp_path):
    def make(kind="static"):
        return shutil.copytree(exports[kind], tmp_path / kind)
    return make


def test_refuses_a_different_tokenizer(copy_of, tiny_model_dir):
    folder = copy_of()
    (folder / "tokenizer.model").write_bytes((tiny_model_dir / "tokenizer.model").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ExportError, match="tokenizer.model .*is not the tokenizer the graphs were exported with"):
        ExportedEngine(folder)


def test_refuses_a_config_of_another_preset(copy_of):
    folder = copy_of()
    Config.from_name("tiny-20b").save(folder)
    with pytest.raises(ExportError, match=r"config.json does not match .*preset 'tiny'.*bias: False in config.json"):
        ExportedEngine(folder)


def test_refuses_a_manifest_that_does_not_match_the_graphs(copy_of):
    """config.json and manifest both rewritten to another preset: the graphs' own weights give it away."""
    folder = copy_of()
    other = Config.from_name("tiny-20b")
    other.save(folder)
    m = json.loads((folder / MANIFEST_FILE).read_text())
    m.update(config=other.to_dict(), preset=other.name)
    (folder / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ExportError, match=r"prefill graph does not match the config \(preset 'tiny-20b'\): "
                                          r"model.layers.0.attention.wk.bias is \[64\], expected absent"):
        ExportedEngine(folder)


def test_refuses_a_swapped_graph_file_and_bad_sizes(copy_of, exports):
    folder = copy_of()
    (folder / "decode.mindir").chmod(0o600)
    shutil.copyfile(exports["dynamic"] / "decode.mindir", folder / "decode.mindir")
    with pytest.raises(ExportError, match="decode.mindir has .* bytes, the manifest says"):
        ExportedEngine(folder)
    with pytest.raises(ExportError, match=r"static shapes for 4 slots x 64 positions; asked for 8 x 64"):
        ExportedEngine(exports["static"], max_batch=8)
    with pytest.raises(ExportError, match="max_len 500 exceeds the model's 128 positions"):
        ExportedEngine(exports["dynamic"], max_len=500)


def test_export_refusals_leave_nothing_behind(tiny_model_dir, exports, tmp_path):
    with pytest.raises(FileExistsError):
        export_mindir(tiny_model_dir, exports["static"])
    with pytest.raises(ExportError, match="max_len 4096 exceeds"):
        export_mindir(tiny_model_dir, tmp_path / "x", max_len=4096)
    calls = []
    with pytest.raises(Cancelled, match="after load"):
        export_mindir(tiny_model_dir, tmp_path / "x", max_len=32, cancel=lambda: calls.append(1) or len(calls) > 1)
    assert list(tmp_path.iterdir()) == []  # no dst, no temporary sibling


def test_cli_export_then_generate(tiny_model_dir, eager, tmp_path, capsys):
    from services.cli import main

    dst = tmp_path / "exp"
    assert main(["export", str(tiny_model_dir), str(dst), "--max-len", "48", "--dynamic"]) == 0
    assert "dynamic shapes, 1 slots x 48 positions" in capsys.readouterr().out
    p = prompts([8], seed=4)[0]
    assert main(["generate", "--model", str(dst), "--ids", ",".join(map(str, p)), "--max-new-tokens", "10",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = [e.token_id for e in generate(eager, p, SamplingParams(max_new_tokens=10, temperature=0.0))]
    assert out["token_ids"] == want
    assert main(["export", str(tiny_model_dir), str(dst)]) == 2  # exists: a clear error, not a traceback
    assert "already exists" in capsys.readouterr().err


def test_split_layout_of_large_models(tiny_model_dir, eager, tmp_path, monkeypatch):
    """Past 1 GB of weights MindSpore writes <name>_graph.mindir + <name>_variables/; force that layout."""
    import mindspore.train.serialization as serialization

    monkeypatch.setattr(serialization, "TOTAL_SAVE", 1)  # MindSpore's own threshold (KB), lowered
    folder = export_mindir(tiny_model_dir, tmp_path / "split", max_batch=2, max_len=32)
    assert read_manifest(folder)["graphs"]["decode"]["file"] == "decode_graph.mindir"
    assert (folder / "decode_variables").is_dir()
    batch, params = prompts([4, 10], seed=5), GREEDY.replace(max_new_tokens=8)
    got = generate_batch(ExportedEngine(folder), batch, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in generate_batch(eager, batch, params)]
    data = next((folder / "prefill_variables").iterdir())
    data.chmod(0o600)
    with open(data, "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(ExportError, match="prefill_graph.mindir has .* bytes, the manifest says"):
        ExportedEngine(folder)


@pytest.fixture(scope="module")
def ntk_20b(tmp_path_factory):
    """The 20B shape (no bias, dynamic NTK, 64 trained positions): (HF reference, model folder)."""
    from internlm_core.convert import hf_to_ms

    cfg = Config.from_name("tiny-20b")
    ref = hf_reference_model(cfg, seed=3)
    root = tmp_path_factory.mktemp("ntk")
    hf_to_ms(save_hf_folder(ref, cfg, root / "hf"), root / "ms")
    return ref, root / "ms"


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_dynamic_ntk_past_the_trained_positions_equals_hf(ntk_20b, tmp_path, kind):
    """Exported with 160 positions, 2.5x the 64 it was trained on: a 90-token prompt (prefilled
    past them) and a 40-token one (whose decode crosses them) give HF's cached greedy generation
    with the same rope scaling, token for token, both in one batch."""
    ref, model_dir = ntk_20b
    engine = ExportedEngine(export_mindir(model_dir, tmp_path / kind, max_batch=2, max_len=160,
                                          dynamic=kind == "dynamic"))
    assert engine.config.rope_scaling == "dynamic" and engine.config.max_position_embeddings == 64
    batch = prompts([90, 40], seed=6)
    results = generate_batch(engine, batch, GREEDY.replace(max_new_tokens=40))
    for p, r in zip(batch, results):
        assert r.token_ids == hf_greedy(ref, p, 40), f"prompt of {len(p)}"


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_batcher_serves_a_long_prompt_whole_next_to_short_ones(exports, eager, kind):
    """An exported engine has no chunked prefill: the continuous batcher must put a prompt of
    nearly the whole cache (60 of 64 positions) in at once while short streams decode, and every
    request gets the eager engine's tokens (the long one until the cache is full)."""
    from internlm_core.batching import Batcher

    engine = ExportedEngine(exports[kind])
    assert engine.prefill_chunk is None
    short, long = prompts([5, 9, 3], seed=7), prompts([60], seed=8)[0]
    want = [r.token_ids for r in generate_batch(eager, short + [long], GREEDY)]
    batcher = Batcher(engine).start()
    try:
        handles = [batcher.submit(p, GREEDY) for p in short]
        next(iter(handles[0]))  # the short ones are decoding when the long one arrives
        handles.append(batcher.submit(long, GREEDY))
        results = [h.result() for h in handles]
    finally:
        batcher.stop(timeout=60)
    assert [r.token_ids for r in results] == want
    assert results[-1].finish_reason == "length" and len(want[-1]) == MAX_LEN - len(long)
