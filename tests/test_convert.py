"""HF <-> MindSpore conversion: every HF layout, dtype handling, exact round trips, bad input."""
import json
import os
import re

import numpy as np
import pytest
import torch

from internlm_core.checkpoint import (Cancelled, CheckpointError, SafetensorsFile, bf16_to_f32, cast,
                                      f32_to_bf16)
from internlm_core.config import Config
from internlm_core.convert import HF_TO_MS, hf_to_ms, ms_to_hf, rename
from tests.helpers import llama_config, random_ids, save_hf_folder


def ms_weights(folder):
    f = SafetensorsFile(folder / "model.safetensors")
    return {k: (f.info(k)[0], np.array(f.get(k))) for k in f.keys()}


def expected_from_hf(ref, torch_dtype):
    out = {}
    for name, t in ref.state_dict().items():
        ms_name = rename(name)
        if ms_name is None:
            continue
        t = t.to(torch_dtype)
        out[ms_name] = t.view(torch.int16).numpy().view(np.uint16) if torch_dtype == torch.bfloat16 else t.numpy()
    return out


LAYOUTS = [("safetensors", True, None), ("safetensors-sharded", True, "60KB"),
           ("bin", False, None), ("bin-sharded", False, "60KB")]


@pytest.mark.parametrize("label, safe, shard", LAYOUTS, ids=[x[0] for x in LAYOUTS])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_hf_layout_converts_exactly(tiny_hf, tiny_config, tmp_path, label, safe, shard, dtype):
    ref = tiny_hf[0]
    src = save_hf_folder(ref, tiny_config, tmp_path / "hf", safetensors=safe, max_shard_size=shard, dtype=dtype)
    names = os.listdir(src)
    assert any(n.endswith("index.json") for n in names) == bool(shard), names
    cfg = hf_to_ms(src, tmp_path / "ms")
    assert cfg.dtype == dtype
    got = ms_weights(tmp_path / "ms")
    want = expected_from_hf(ref, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    assert set(got) == set(want)
    for k in want:
        assert got[k][0] == {"float32": "F32", "bfloat16": "BF16"}[dtype]
        np.testing.assert_array_equal(got[k][1], want[k], err_msg=k)
    assert json.loads((tmp_path / "ms" / "config.json").read_text())["format"].startswith("internlm-mindspore")
    assert (tmp_path / "ms" / "tokenizer.model").is_file()


def test_target_dtype_matches_torch_rounding(tiny_hf, tiny_config, tmp_path):
    ref = tiny_hf[0]
    hf_to_ms(tiny_hf[1], tmp_path / "bf16", dtype="bfloat16")
    hf_to_ms(tiny_hf[1], tmp_path / "fp16", dtype="float16")
    bf, fp = ms_weights(tmp_path / "bf16"), ms_weights(tmp_path / "fp16")
    for k, v in expected_from_hf(ref, torch.bfloat16).items():
        np.testing.assert_array_equal(bf[k][1], v)
    for k, v in expected_from_hf(ref, torch.float16).items():
        np.testing.assert_array_equal(fp[k][1], v)


def test_bf16_bit_helpers():
    x = np.array([1.0, -2.5, 3.14159, 1e-30, np.inf, np.nan], np.float32)
    want = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = f32_to_bf16(x)
    np.testing.assert_array_equal(got[:5], want[:5])
    assert np.isnan(bf16_to_f32(got[5:]))[0]  # NaN stays NaN (payload bits may differ from torch's)
    np.testing.assert_array_equal(bf16_to_f32(want)[:5], torch.tensor(x).to(torch.bfloat16).float().numpy()[:5])
    assert cast(want, "BF16", "BF16") is want


def test_ms_hf_ms_round_trip_is_bit_exact_and_hf_loads_it(tiny_hf, tiny_config, tiny_model_dir, tmp_path):
    from transformers import LlamaForCausalLM

    ms_to_hf(tiny_model_dir, tmp_path / "hf")
    hf_to_ms(tmp_path / "hf", tmp_path / "ms2")
    assert (tiny_model_dir / "model.safetensors").read_bytes() == (tmp_path / "ms2" / "model.safetensors").read_bytes()
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == "internlm" and hf_cfg["bias"] is True
    # HF tools load the folder (LLaMA classes, since InternLM's own code is remote code)
    again = LlamaForCausalLM.from_pretrained(tmp_path / "hf", config=llama_config(tiny_config)).eval()
    ids = torch.tensor([random_ids(12, 512)])
    with torch.no_grad():
        np.testing.assert_array_equal(again(ids).logits.numpy(), tiny_hf[0](ids).logits.numpy())


def test_name_map_covers_every_hf_name(tiny_hf):
    for name in tiny_hf[0].state_dict():
        assert rename(name) is not None
    assert rename("model.layers.7.self_attn.rotary_emb.inv_freq") is None
    assert len({v for v in HF_TO_MS.values() if v}) == len([v for v in HF_TO_MS.values() if v])


def _no_leftovers(parent, name):
    assert not (parent / name).exists()
    assert [p for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


def test_truncated_safetensors(tiny_hf, tiny_config, tmp_path):
    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        hf_to_ms(src, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_missing_tensor_is_named(tiny_hf, tiny_config, tmp_path):
    from safetensors.torch import save_file

    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf")
    sd = {k: v.contiguous() for k, v in tiny_hf[0].state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(sd, src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.1.feed_forward.w3.weight"):
        hf_to_ms(src, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_config_that_does_not_match_weights(tiny_hf, tiny_config, tmp_path):
    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf")
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="shape .* does not match the config"):
        hf_to_ms(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**hf, "bias": False}))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        hf_to_ms(src, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_no_weights_and_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        hf_to_ms(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(Config.from_name("tiny").to_hf_config()))
    with pytest.raises(CheckpointError, match="no .*safetensors"):
        hf_to_ms(tmp_path / "empty", tmp_path / "out")


def test_corrupt_torch_pickle(tiny_hf, tiny_config, tmp_path):
    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf", safetensors=False)
    (src / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot be read as a torch checkpoint"):
        hf_to_ms(src, tmp_path / "out")


def test_cancel_and_existing_destination(tiny_hf, tmp_path, tiny_model_dir):
    calls = []
    with pytest.raises(Cancelled):
        hf_to_ms(tiny_hf[1], tmp_path / "out", cancel=lambda: calls.append(1) or len(calls) > 3)
    _no_leftovers(tmp_path, "out")
    before = (tiny_model_dir / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        hf_to_ms(tiny_hf[1], tiny_model_dir)
    assert (tiny_model_dir / "model.safetensors").read_bytes() == before


def test_progress_reports_bytes(tiny_hf, tmp_path):
    seen = []
    hf_to_ms(tiny_hf[1], tmp_path / "out", progress=lambda d, t, n: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] > 0 and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_a_cut_conversion_resumes_after_the_tensors_it_verified(tiny_hf, tmp_path):
    """What a killed conversion job finds in its work folder: the next run keeps the journaled
    tensors whose bytes still match their CRC, rewrites from the first that does not, and gives
    the same file as a conversion that was never cut."""
    import json
    import struct

    straight = tmp_path / "straight"
    hf_to_ms(tiny_hf[1], straight)
    work, calls = tmp_path / "work", []
    with pytest.raises(Cancelled):
        hf_to_ms(tiny_hf[1], tmp_path / "out", work_dir=work, cancel=lambda: calls.append(1) or len(calls) > 6)
    journal = (work / "model.safetensors.journal").read_text().splitlines()
    assert len(journal) == 6
    # Damage the fourth tensor's bytes: only the three before it may be kept.
    data = bytearray((work / "model.safetensors").read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    data[8 + n + header[journal[3].split()[0]]["data_offsets"][0]] ^= 0xFF
    (work / "model.safetensors").write_bytes(bytes(data))
    seen = []
    hf_to_ms(tiny_hf[1], tmp_path / "out", work_dir=work, progress=lambda d, t, name: seen.append(name))
    assert seen[0] == f"kept 3 of {len(header) - 1} tensors written and verified earlier"
    assert len(seen) == 1 + len(header) - 1 - 3  # the rest written again, one report each
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert list(work.iterdir()) == []  # the file moved into the model folder, the journal gone


def test_a_resumed_conversion_with_other_settings_starts_over(tiny_hf, tmp_path):
    work, calls = tmp_path / "work", []
    with pytest.raises(Cancelled):
        hf_to_ms(tiny_hf[1], tmp_path / "out", work_dir=work, cancel=lambda: calls.append(1) or len(calls) > 4)
    seen = []
    hf_to_ms(tiny_hf[1], tmp_path / "out", dtype="float16", work_dir=work, progress=lambda d, t, name: seen.append(name))
    assert not any(name.startswith("kept") for name in seen)  # another header: nothing kept
    hf_to_ms(tiny_hf[1], tmp_path / "ref", dtype="float16")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_names_with_a_trailing_newline_match_no_template():
    assert rename("model.norm.weight") == "model.norm_out.weight"
    with pytest.raises(KeyError):
        rename("model.norm.weight\n")  # '$' alone would let it through, as a second norm
    with pytest.raises(KeyError):
        rename("model.layers.0.mlp.up_proj.weight\n")


def test_index_shards_are_confined_to_the_folder(tmp_path):
    """An ``*.index.json`` names shard files: only plain paths inside the model folder, never an
    absolute path, '..' or a symlinked subfolder leading out; the error names the index."""
    from internlm_core.checkpoint import SafetensorsWriter
    from internlm_core.convert import open_weights

    def shard(path):
        w = SafetensorsWriter(path, [("model.norm.weight", "F32", (4,))])
        w.write("model.norm.weight", np.ones(4, np.float32))
        w.close()

    outside = tmp_path / "outside"
    outside.mkdir()
    shard(outside / "model-00001.safetensors")
    folder = tmp_path / "hf"
    folder.mkdir()
    shard(folder / "model-00001.safetensors")
    os.symlink(outside, folder / "sub")
    index = folder / "model.safetensors.index.json"

    def with_map(weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return open_weights(folder)

    assert set(with_map({"model.norm.weight": "model-00001.safetensors"})) == {"model.norm.weight"}
    for bad, message in [("../outside/model-00001.safetensors", "is not a file name inside the folder"),
                         (str(outside / "model-00001.safetensors"), "is not a file name inside the folder"),
                         ("sub/../model-00001.safetensors", "is not a file name inside the folder"),
                         ("", "is not a file name inside the folder"),
                         ("sub/model-00001.safetensors", "leads outside the folder through a symlink")]:
        expected = f"hf/model.safetensors.index.json: shard {bad!r} {message}"
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            with_map({"model.norm.weight": bad})
    for weight_map in (["model-00001.safetensors"], {"model.norm.weight": 1}):
        with pytest.raises(CheckpointError, match="index.json: weight_map must map tensor names to shard file names"):
            with_map(weight_map)
    index.write_text("[]")
    with pytest.raises(CheckpointError, match="index.json: not a JSON object with a weight_map"):
        open_weights(folder)


def test_a_model_folder_is_known_by_its_parsed_config(tmp_path):
    """A folder is a model of ours when its config.json, read as JSON, carries our format tag at the
    top: written compactly too, and not when the tag is only a value nested inside (as text
    matching would have it), nor for an HF config or a config that is not JSON."""
    from internlm_core.checkpoint import WEIGHTS_FILE
    from internlm_core.config import FORMAT_TAG
    from internlm_core.convert import is_model_folder

    def folder(name, config_text, weights=True):
        f = tmp_path / name
        f.mkdir()
        (f / "config.json").write_text(config_text)
        if weights:
            (f / WEIGHTS_FILE).write_bytes(b"")
        return f

    assert is_model_folder(folder("compact", json.dumps({"format": FORMAT_TAG}, separators=(",", ":"))))
    assert not is_model_folder(folder("nested", json.dumps({"format": "hf", "note": {"format": FORMAT_TAG}})))
    assert not is_model_folder(folder("hf", json.dumps({"model_type": "internlm"})))
    assert not is_model_folder(folder("broken", '{"format": "' + FORMAT_TAG + '", '))
    assert not is_model_folder(folder("no-weights", json.dumps({"format": FORMAT_TAG}), weights=False))


def hf_cache(folder, root, repo="models--internlm--tiny", rev="0123abcd"):
    """``folder`` laid out as the Hugging Face cache holds a download: each file a blob named by its
    hash, the snapshot folder relative links to them (``snapshots/<rev>/f -> ../../blobs/<hash>``)."""
    import hashlib
    import shutil

    blobs, snapshot = root / repo / "blobs", root / repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / f.name)
    return snapshot


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["one file", "sharded"])
def test_a_hugging_face_cache_snapshot_converts_through_its_links(tiny_hf, tiny_config, tmp_path, shard):
    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf", max_shard_size=shard)
    snapshot = hf_cache(src, tmp_path / "cache")
    assert all(f.is_symlink() for f in snapshot.iterdir())
    hf_to_ms(snapshot, tmp_path / "from-cache")
    hf_to_ms(src, tmp_path / "from-folder")
    assert (tmp_path / "from-cache" / "model.safetensors").read_bytes() == \
        (tmp_path / "from-folder" / "model.safetensors").read_bytes()


def test_weights_linked_from_outside_the_folder_are_refused(tiny_hf, tiny_config, tmp_path):
    """A weights file (a lone one, a shard, the index, a project folder's) that is a symlink leading
    outside its folder is refused, naming it: to /etc/passwd, to a real checkpoint elsewhere, or, in
    a cache snapshot, to another repository's blobs."""
    from internlm_core.convert import open_weights

    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf", max_shard_size="60KB")
    elsewhere = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "elsewhere")
    refused = "leads outside the folder through a symlink"

    shard = sorted(src.glob("model-*.safetensors"))[0]
    for target in ("/etc/passwd", elsewhere / "model.safetensors"):
        shard.unlink()
        os.symlink(target, shard)
        with pytest.raises(CheckpointError, match=re.escape(f"shard {shard.name!r} {refused}")):
            open_weights(src)
    index = src / "model.safetensors.index.json"
    index.rename(tmp_path / "index.json")
    os.symlink(tmp_path / "index.json", index)
    with pytest.raises(CheckpointError, match=re.escape(f"hf/{index.name} {refused}")):
        open_weights(src)

    lone = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "lone")
    (lone / "model.safetensors").unlink()
    os.symlink("/etc/passwd", lone / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"lone/model.safetensors {refused}")):
        hf_to_ms(lone, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # A snapshot whose link leads to another repository's blobs: not its own download.
    snapshot = hf_cache(save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "mine"), tmp_path / "cache")
    other = hf_cache(elsewhere, tmp_path / "cache", repo="models--someone--else")
    (snapshot / "model.safetensors").unlink()
    os.symlink(os.readlink(other / "model.safetensors").replace("../../blobs", "../../../models--someone--else/blobs"),
               snapshot / "model.safetensors")
    assert (snapshot / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match=refused):
        hf_to_ms(snapshot, tmp_path / "out")

    # A project folder (what a worker loads, what ms_to_hf reads) alike.
    ms = tmp_path / "ms"
    hf_to_ms(elsewhere, ms)
    (ms / "model.safetensors").rename(tmp_path / "weights.safetensors")
    os.symlink(tmp_path / "weights.safetensors", ms / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"ms/model.safetensors {refused}")):
        ms_to_hf(ms, tmp_path / "back")
