"""The safetensors reader against hostile headers: every record must stay inside the file and
describe exactly the bytes it spans, or the file is refused with an error naming it."""
import json
import struct

import numpy as np
import pytest

from internlm_core.checkpoint import CheckpointError, SafetensorsFile, SafetensorsWriter


def write(path, header, data: bytes = b"", declared: int | None = None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    return path


def test_a_written_file_reads_back(tmp_path):
    w = SafetensorsWriter(tmp_path / "ok.safetensors", [("a", "F32", (2, 3)), ("b", "BF16", (4,))])
    w.write("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write("b", np.arange(4, dtype=np.uint16))
    w.close()
    f = SafetensorsFile(tmp_path / "ok.safetensors")
    np.testing.assert_array_equal(f.get("a"), np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("header, data, declared, message", [
    ({}, b"", 10**6, "truncated or not a safetensors file"),           # header length past the file
    ({}, b"", 2**63, "truncated or not a safetensors file"),
    (b"[1, 2]", b"", None, "corrupt header \\(not a JSON object\\)"),
    (b"{not json", b"", None, "corrupt header"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 40]}}, bytes(8), None,
     "tensor 'w': truncated"),                                          # data past the file
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None, "bad data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), None, "bad data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8), None, "bad data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, bytes(8), None, "bad data_offsets"),
    # a record that stands for more bytes than it spans: reading it would run on past them
    ({"w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 8]}}, bytes(8), None,
     r"F32\[1000000\] is 4000000 bytes, but its data_offsets span 8"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "bad shape"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, bytes(8), None, "bad shape"),
    ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), None, "corrupt header entry"),
    ({"w": [0, 8]}, bytes(8), None, "corrupt header entry"),
], ids=["length past the file", "length 2^63", "a list", "not json", "offsets past the file", "offsets reversed",
        "negative offset", "one offset", "float offsets", "shape larger than its bytes", "negative shape",
        "shape not a list", "no shape", "entry not an object"])
def test_hostile_headers_are_refused_naming_the_file(tmp_path, header, data, declared, message):
    path = write(tmp_path / "bad.safetensors", header, data, declared)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: .*{message}"):
        SafetensorsFile(path)
