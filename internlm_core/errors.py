"""The errors the core raises, and the one table that says what each means to a caller.

Framework-free: the gRPC interceptor, the Jobs API, the job tasks (and an HTTP API) all read
``status_of`` and translate its status name (gRPC's code names, the most precise vocabulary of
the three) into their own terms, so one error means the same on every path.
"""
from __future__ import annotations


# ---- bad input: the caller can fix it (all ValueErrors, so plain Python code may catch them so) ----
class ConfigError(ValueError):
    """A config that cannot describe a valid model (unknown preset, bad numbers)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config."""


class TokenizerError(ValueError):
    """Text or ids the tokenizer cannot take (bad ids, a tokenizer file that cannot be loaded)."""


class PromptTooLong(ValueError):
    """A prompt (with the tokens it must leave room for) longer than the engine's positions."""


class DataError(ValueError):
    """Input data that cannot be turned into training rows (bad JSON, wrong fields, nothing left)."""


class AdapterError(ValueError):
    """An adapter folder that is missing, malformed or made for a different base model."""


class ExportError(ValueError):
    """An export that cannot be made, or an exported folder that does not hold together."""


class PathError(ValueError):
    """A path or name from a request that is not allowed (outside the roots, not a plain name)."""


class TooLarge(ValueError):
    """A request beyond a bound: more than a configured limit allows (steps, sizes), or a model
    that cannot fit this machine's memory for what the request would do with it."""


class GrammarError(ValueError):
    """A structured-output grammar that cannot be compiled or followed (invalid, unsupported, too large)."""


class ToolError(ValueError):
    """A request's tools or tool choice that cannot be used (a bad name or schema, an unknown tool named)."""


# ---- lookups, conflicts, capacity ---------------------------------------------------------------
class AdapterNotFound(KeyError):
    """A request named a LoRA adapter that this engine does not hold (never fall back silently)."""

    def __str__(self):
        return f"unknown adapter {self.args[0]!r}"


class ModelNotFound(LookupError):
    """A request named a model that nothing here serves."""


class AlreadyExists(Exception):
    """The request would replace something that exists (an output, an idempotency key's job)."""


class WrongState(RuntimeError):
    """The request does not apply to the thing in the state it is in now (cancel a job that ended)."""


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound: try again later."""


class TooManyCalls(RuntimeError):
    """A caller (or all callers together) holds as many long calls (streams) open as a server admits
    at once: try again when one ends."""


class ShuttingDown(RuntimeError):
    """The batcher no longer accepts requests."""


class Unavailable(RuntimeError):
    """Nothing can take the request now (no live worker, a worker lost mid-stream): retry later."""


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed before the work was done (a call retried on other workers included)."""


class Cancelled(Exception):
    """Raised between steps (tensors, rows) when a caller's cancel check returns True."""


# Error type -> status, first match wins (so subclasses come before their bases). Anything else is
# an internal error: logged with its traceback, and reported as such.
STATUS: tuple[tuple[type[BaseException], str], ...] = (
    (AdapterNotFound, "NOT_FOUND"),
    (ModelNotFound, "NOT_FOUND"),
    (FileNotFoundError, "NOT_FOUND"),
    (AlreadyExists, "ALREADY_EXISTS"),
    (FileExistsError, "ALREADY_EXISTS"),
    (WrongState, "FAILED_PRECONDITION"),
    (QueueFull, "RESOURCE_EXHAUSTED"),
    (TooManyCalls, "RESOURCE_EXHAUSTED"),
    (ShuttingDown, "UNAVAILABLE"),
    (Unavailable, "UNAVAILABLE"),
    (DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (Cancelled, "CANCELLED"),
    (ValueError, "INVALID_ARGUMENT"),
)
INTERNAL = "INTERNAL"


def status_of(e: BaseException) -> str:
    """The status name for an exception (``INTERNAL`` when it is none of the core's errors)."""
    for kind, status in STATUS:
        if isinstance(e, kind):
            return status
    return INTERNAL
