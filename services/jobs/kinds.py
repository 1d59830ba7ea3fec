"""The kinds of job, one table: each kind's name, its submit-time check (``checks.py``, in the
endpoint) and its runner (``runners.py``, in a job worker), and its one-line description.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from internlm_core.store import Store

from . import checks, runners


@dataclass(frozen=True)
class JobKind:
    """One kind of job. Its ``name`` is the field of ``SubmitJobRequest``'s ``job`` oneof, the Celery
    queue and task (``app.task_name``), the ``internlm jobs submit`` subcommand, and, upper-cased
    after ``JOB_KIND_``, the value of the proto's ``JobKind`` enum (``enum_name``); a test holds the
    proto to this table."""
    name: str
    check: Callable[[dict, Store], str]  # in the endpoint, before queueing: the output's store path
    run: Callable[[dict, object], dict]  # in a worker: the job's result
    help: str


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("convert", checks.check_convert, runners.run_convert, "HF InternLM folder -> model in the store"),
    JobKind("preprocess", checks.check_preprocess, runners.run_preprocess, "Alpaca JSON or WikiText -> MindRecord dataset in the store"),
    JobKind("finetune", checks.check_finetune, runners.run_finetune, "full or LoRA fine-tuning of a model in the store"),
    JobKind("export", checks.check_export, runners.run_export, "model in the store -> MindIR prefill/decode graphs"),
)}
ENUM_PREFIX = "JOB_KIND_"


def enum_name(kind: str) -> str:
    """The proto ``JobKind`` value's name for a kind (``convert`` -> ``JOB_KIND_CONVERT``)."""
    return ENUM_PREFIX + kind.upper()


def kind_of_enum(name: str) -> str:
    """The kind a proto ``JobKind`` value's name stands for (``JOB_KIND_CONVERT`` -> ``convert``)."""
    return name.removeprefix(ENUM_PREFIX).lower()
