"""The layering rules the code relies on, pinned: the framework-free modules import with MindSpore
blocked (the endpoint, the job checks, the table of job kinds that names the runners, and the
memory planner run where MindSpore must not load: it takes seconds and ~0.5 GB), and no module of
the core imports a service framework (gRPC,
Celery, Redis, HTTP): services call the core, never the other way."""
import pkgutil
import subprocess
import sys

import internlm_core

# Modules that must import without MindSpore; each keeps MindSpore's imports inside the functions
# that need them (the runners a job worker calls, the loaders) or has none.
FRAMEWORK_FREE = (
    "internlm_core.config", "internlm_core.errors", "internlm_core.memory", "internlm_core.quantize",
    "internlm_core.store", "internlm_core.train_args", "internlm_core.tokenizer", "internlm_core.generation",
    "internlm_core.checkpoint", "internlm_core.data", "internlm_core.torch_bin", "internlm_core.schedule",
    "internlm_core.tools",
    "services.endpoint", "services.gateway", "services.registry", "services.jobs.api", "services.jobs.kinds",
    "services.jobs.checks", "services.jobs.runners", "internlm_core.convert",  # convert: the checks call it
)
SERVICE_FRAMEWORKS = ("grpc", "celery", "redis", "fastapi", "starlette", "uvicorn")

BLOCK = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(name + " is blocked: this module must not need it")
sys.meta_path.insert(0, Block())
for m in {modules!r}:
    importlib.import_module(m)
print("imported", len({modules!r}))
"""


def _import_with(blocked, modules):
    code = BLOCK.format(blocked=set(blocked), modules=list(modules))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_framework_free_modules_import_without_mindspore():
    out = _import_with({"mindspore", "mindformers"}, FRAMEWORK_FREE)
    assert out.returncode == 0 and out.stdout.strip() == f"imported {len(FRAMEWORK_FREE)}", out.stderr[-3000:]


def test_the_core_imports_no_service_framework():
    modules = [m.name for m in pkgutil.iter_modules(internlm_core.__path__, "internlm_core.")]
    assert "internlm_core.engine" in modules and len(modules) > 20
    out = _import_with(SERVICE_FRAMEWORKS, modules)
    assert out.returncode == 0 and out.stdout.strip() == f"imported {len(modules)}", out.stderr[-3000:]


def test_the_blocker_blocks():
    """The check above would fail if a module did import a blocked one."""
    out = _import_with({"grpc"}, ["services.endpoint"])
    assert out.returncode != 0 and "grpc is blocked" in out.stderr
