"""``pytorch_model*.bin`` read without torch: same tensors as ``torch.load``, hostile pickles refused.

torch is used here only to write the files and as the reference reader; the code under test
never imports it (checked in subprocesses with torch blocked).
"""
import ast
import json
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from internlm_core.convert import open_weights
from internlm_core.errors import CheckpointError
from internlm_core.torch_bin import TorchBinFile
from internlm_core.convert import hf_to_ms
from tests.helpers import REPO, save_hf_folder

RUNTIME_FORBIDDEN = ("torch", "transformers", "mindformers")  # safetensors comes with mindspore


def torch_as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def assert_same_as_torch(path):
    want = torch.load(path, map_location="cpu", weights_only=True)
    got = TorchBinFile(path)
    assert list(got.keys()) == list(want.keys())
    for k, t in want.items():
        st, shape = got.info(k)
        assert st == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[t.dtype], k
        assert shape == tuple(t.shape), k
        a = got.get(k)
        assert a.dtype == torch_as_numpy(t).dtype, k
        np.testing.assert_array_equal(a, torch_as_numpy(t), err_msg=k)
    return got


def test_every_tensor_equals_torch_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    big = torch.randn(4, 8, generator=g)
    sd = OrderedDict(
        fp32=torch.randn(3, 5, generator=g),
        fp16=torch.randn(7, 2, generator=g).half(),
        bf16=torch.randn(4, 9, generator=g).to(torch.bfloat16),
        transposed=base.t(),                       # non-contiguous: strides (1, 10)
        offset_view=base[2:5, 3:9],                # storage offset 23, strides (10, 1)
        column=big[:, 5],                          # a strided 1-d view into a shared storage
        shared=big,                                # the same storage as "column"
        bf16_view=torch.randn(5, 6, generator=g).to(torch.bfloat16)[1:, ::2],
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        param=torch.nn.Parameter(torch.randn(2, 3, generator=g)),
    )
    assert not sd["transposed"].is_contiguous() and sd["offset_view"].storage_offset() == 23
    torch.save(sd, tmp_path / "w.bin")
    got = assert_same_as_torch(tmp_path / "w.bin")
    # read-only views of the file's memory map, not copies
    a = got.get("offset_view")
    assert not a.flags.writeable
    bases = []
    while a is not None:
        bases.append(a)
        a = getattr(a, "base", None)
    assert any(isinstance(b, np.memmap) for b in bases)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sharded_hf_checkpoint_with_index(tiny_hf, tiny_config, tmp_path, dtype):
    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf", safetensors=False, max_shard_size="60KB",
                         dtype=dtype)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1
    for shard in shards:
        assert_same_as_torch(src / shard)
    where = open_weights(src)
    assert set(where) == set(index)
    for name, shard in index.items():
        assert where[name].path.name == shard


def test_hf_bin_folder_converts_without_importing_torch(tiny_hf, tiny_config, tmp_path):
    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf", safetensors=False, max_shard_size="60KB",
                         dtype="bfloat16")
    code = ("import sys\n"
            "from internlm_core.convert import hf_to_ms\n"
            "from internlm_core.checkpoint import SafetensorsFile\n"
            f"cfg = hf_to_ms({str(src)!r}, {str(tmp_path / 'ms')!r})\n"
            "assert cfg.dtype == 'bfloat16', cfg.dtype\n"
            f"assert len(list(SafetensorsFile({str(tmp_path / 'ms' / 'model.safetensors')!r}).keys())) > 0\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {RUNTIME_FORBIDDEN!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    # the same bytes as a conversion of the same weights saved as safetensors
    st = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf-st", dtype="bfloat16")
    hf_to_ms(st, tmp_path / "ms-st")
    assert (tmp_path / "ms" / "model.safetensors").read_bytes() == (tmp_path / "ms-st" / "model.safetensors").read_bytes()


# The CLI with the test-only packages made unimportable, as on a runtime-only install.
BLOCKED_CLI = f"""
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {RUNTIME_FORBIDDEN!r}:
            raise ImportError(f"{{name}} is not a runtime dependency (blocked by the test)")

sys.meta_path.insert(0, Blocked())
from services.cli import main
sys.exit(main(sys.argv[1:]))
"""


def blocked_cli(*args):
    return subprocess.run([sys.executable, "-c", BLOCKED_CLI, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_converts_and_generates_with_torch_blocked(tiny_hf, tiny_config, tmp_path):
    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf", safetensors=False, dtype="float16")
    proc = blocked_cli("convert", src, tmp_path / "ms")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ms" / "model.safetensors").is_file()
    proc = blocked_cli("generate", "--model", tmp_path / "ms", "--ids", "1,5,9", "--max-new-tokens", 3, "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 3
    # the block is real: importing torch under it fails
    probe = subprocess.run([sys.executable, "-c", BLOCKED_CLI.replace("from services.cli", "import torch\nfrom services.cli")],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "not a runtime dependency" in probe.stderr


def test_no_runtime_module_imports_test_only_packages():
    """Static guard over the core and the services: no import of torch & co anywhere, lazy or not."""
    offenders = []
    for folder in ("internlm_core", "services"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in RUNTIME_FORBIDDEN]
    assert offenders == []


# ---- hostile and damaged files ------------------------------------------------------------

class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class CallsTorch:
    """Even torch's own functions are refused unless a state dict needs them."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return torch.save, ({}, str(self.marker))


@pytest.mark.parametrize("evil, global_name", [
    (RunsShell, "posix.system"), (OpensFile, "io.open"), (CallsTorch, "torch.serialization.save")])
def test_hostile_pickle_is_refused_and_nothing_runs(tiny_hf, tiny_config, tmp_path, evil, global_name):
    marker = tmp_path / "pwned"
    sd = dict(tiny_hf[0].state_dict())
    sd["model.norm.weight"] = evil(marker)
    src = save_hf_folder(tiny_hf[0], tiny_config, tmp_path / "hf", safetensors=False)
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"pytorch_model.bin: refused global {global_name}"):
        TorchBinFile(src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"refused global {global_name}"):
        hf_to_ms(src, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_hostile_plain_pickle_and_legacy_format_are_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    (tmp_path / "plain.bin").write_bytes(pickle.dumps({"w": RunsShell(marker)}))
    with pytest.raises(CheckpointError, match="cannot be read as a torch checkpoint"):
        TorchBinFile(tmp_path / "plain.bin")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .*format"):
        TorchBinFile(tmp_path / "legacy.bin")
    assert not marker.exists()


def _rewrite_member(path, name_suffix, fn):
    """Rewrite one member of a torch zip archive (stored, as torch writes them)."""
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, fn(data) if name.endswith(name_suffix) else data)


def test_damaged_archives_give_clear_errors(tmp_path):
    torch.save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, tmp_path / "w.bin")
    assert_same_as_torch(tmp_path / "w.bin")  # a rewritten archive still reads
    _rewrite_member(tmp_path / "w.bin", "data.pkl", lambda d: d)
    assert_same_as_torch(tmp_path / "w.bin")

    short = tmp_path / "short.bin"
    short.write_bytes((tmp_path / "w.bin").read_bytes())
    _rewrite_member(short, "/data/0", lambda d: d[:-4])
    with pytest.raises(CheckpointError, match="storage 0 holds 44 bytes, its record says 12 x float32"):
        TorchBinFile(short)

    cut = tmp_path / "cut.bin"
    cut.write_bytes((tmp_path / "w.bin").read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="cut.bin: cannot be read as a torch checkpoint"):
        TorchBinFile(cut)

    not_sd = tmp_path / "list.bin"
    torch.save([torch.ones(2)], not_sd)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        TorchBinFile(not_sd)


# ---- hostile archives: sizes that the file's own bytes do not back ------------------------------

class _Storage:
    """Stands for storage "0" in a crafted pickle (its persistent id says how many elements)."""


class _Tensor:
    def __init__(self, offset, size, stride):
        self.args = (_Storage(), offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler:
    """A ``data.pkl`` as torch writes one, for the tensor records a test makes up."""

    def __init__(self, numel):
        import pickle

        class P(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, _Storage) else None
        self.cls = P

    def dumps(self, obj) -> bytes:
        import io

        buf = io.BytesIO()
        self.cls(buf, protocol=2).dump(obj)
        return buf.getvalue()


def _crafted_bin(path, size, stride, offset=0, numel=4, stored=None):
    """A torch-layout archive of one float32 tensor record over a storage of ``numel`` elements
    (``stored`` elements actually written, if other)."""
    pkl = _Pickler(numel).dumps(OrderedDict(w=_Tensor(offset, size, stride)))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", np.arange(numel if stored is None else stored, dtype=np.float32).tobytes())
    return path


def test_tensor_records_are_bounded_by_their_storage(tmp_path):
    ok = TorchBinFile(_crafted_bin(tmp_path / "ok.bin", (2, 2), (2, 1)))  # the crafting itself reads
    np.testing.assert_array_equal(ok.get("w"), np.arange(4, dtype=np.float32).reshape(2, 2))
    cases = {
        # 4 bytes of file standing for a terabyte-sized broadcast
        "zero stride": (dict(size=(10**12,), stride=(0,)), "has a stride of 0"),
        "zero stride, 2-d": (dict(size=(1000, 1000), stride=(0, 1)), "has a stride of 0"),
        # overlapping strides: 6 elements out of a storage of 4, without reaching past its end
        "overlap": (dict(size=(2, 3), stride=(1, 1)), r"shape \[2, 3\] has more elements than its storage of 4"),
        "offset": (dict(size=(4,), stride=(1,), offset=2), "more elements than its storage"),
        "past the end": (dict(size=(2,), stride=(3,), offset=1), "reaches past its storage"),
        # a storage that says it is larger than the bytes the archive holds for it
        "storage size": (dict(size=(10**9,), stride=(1,), numel=10**9, stored=4), "holds 16 bytes, its record says"),
    }
    for label, (kw, message) in cases.items():
        path = _crafted_bin(tmp_path / "bad.bin", **kw)
        with pytest.raises(CheckpointError, match=f"bad.bin: .*{message}"):
            TorchBinFile(path)
            pytest.fail(label)


def test_a_compressed_pickle_may_not_unpack_past_the_archive(tmp_path):
    """A zip bomb: ``data.pkl`` deflated from 64 MiB of zeros to a few KB; torch never compresses it."""
    bomb = tmp_path / "bomb.bin"
    with zipfile.ZipFile(bomb, "w") as z:
        z.writestr("archive/data.pkl", bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=r"bomb.bin: archive/data.pkl unpacks to 67108864 bytes, more than "
                                              rf"the {bomb.stat().st_size} allowed"):
        TorchBinFile(bomb)
