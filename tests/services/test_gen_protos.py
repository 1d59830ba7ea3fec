"""The checked-in stubs are exactly what the protos generate, and the check notices a difference."""
import subprocess
import sys

from services import gen_protos
from tests.helpers import REPO


def test_checked_in_stubs_are_current():
    r = subprocess.run([sys.executable, "-m", "services.gen_protos", "--check"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_check_reports_stale_and_leftover_stubs():
    files = gen_protos.generate()
    assert {"inference_pb2.py", "inference_pb2_grpc.py", "tokenizer_pb2.py", "endpoint_pb2.py",
            "common_pb2.py"} <= set(files)
    assert "from . import common_pb2" in files["inference_pb2.py"]  # imports fixed for the package
    assert gen_protos.stale(files) == []
    changed = dict(files, **{"inference_pb2.py": files["inference_pb2.py"] + "# edited\n"})
    del changed["endpoint_pb2.py"]  # as if endpoint.proto had been deleted: its stub is a leftover
    assert gen_protos.stale(changed) == ["endpoint_pb2.py", "inference_pb2.py"]
