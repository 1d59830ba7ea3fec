"""llama.cpp as the benchmarks' reference: built once from the ``llama-cpp-python`` sdist on PyPI
(its ``vendor/llama.cpp``), cached outside the repository, and driven through its own tools.

    python bench/llamacpp.py            # build (or find) it and print where it is

The cache is ``$INTERNLM_LLAMACPP_DIR`` (default ``~/.cache/internlm/llama.cpp-<version>``): the
sdist, its unpacked ``llama.cpp`` source with ``convert_hf_to_gguf.py``, and ``build/bin`` with
``llama-server`` and ``llama-quantize`` (cmake, Release, native CPU flags: ~7 minutes on 2 cores).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's release, whose vendor/llama.cpp is the reference
TOOLS = ("llama-server", "llama-quantize")


def home() -> Path:
    default = Path.home() / ".cache" / "internlm" / f"llama.cpp-{VERSION}"
    return Path(os.environ.get("INTERNLM_LLAMACPP_DIR", default))


def source() -> Path:
    """The unpacked llama.cpp source (downloads the sdist once)."""
    root = home()
    src = root / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(root)], check=True)
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(src.with_name("llama.cpp.partial"), members=members, filter="data")
    os.replace(src.with_name("llama.cpp.partial"), src)
    return src


def binaries() -> dict[str, Path]:
    """{tool name: path}, building them the first time."""
    src = source()
    build = src / "build"
    found = {t: build / "bin" / t for t in TOOLS}
    if all(p.is_file() for p in found.values()):
        return found
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count() or 2),
                    "--target", *TOOLS], check=True)
    return found


def to_gguf(hf_folder: Path, out: Path, outtype: str) -> Path:
    """``convert_hf_to_gguf.py`` on an HF folder (outtype f32 | bf16 | f16 | q8_0)."""
    if out.is_file():
        return out
    src = source()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_folder), "--outtype", outtype,
                    "--outfile", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def quantize(gguf: Path, out: Path, kind: str = "Q8_0") -> Path:
    if not out.is_file():
        subprocess.run([str(binaries()["llama-quantize"]), str(gguf), str(out), kind], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


if __name__ == "__main__":
    for name, path in binaries().items():
        print(name, path)
