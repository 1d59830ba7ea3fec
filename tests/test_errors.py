"""The one table from the core's errors to statuses: each error lands where its meaning says,
subclasses before their bases, and every status name is a real gRPC code."""
import grpc
import pytest

from internlm_core import errors
from internlm_core.errors import status_of


@pytest.mark.parametrize("error, status", [
    (errors.ConfigError("x"), "INVALID_ARGUMENT"), (errors.CheckpointError("x"), "INVALID_ARGUMENT"),
    (errors.TokenizerError("x"), "INVALID_ARGUMENT"), (errors.PromptTooLong("x"), "INVALID_ARGUMENT"),
    (errors.DataError("x"), "INVALID_ARGUMENT"), (errors.AdapterError("x"), "INVALID_ARGUMENT"),
    (errors.ExportError("x"), "INVALID_ARGUMENT"), (errors.PathError("x"), "INVALID_ARGUMENT"),
    (errors.TooLarge("x"), "INVALID_ARGUMENT"),
    (ValueError("x"), "INVALID_ARGUMENT"),
    (errors.AdapterNotFound("a"), "NOT_FOUND"),  # a KeyError: not an internal error
    (errors.ModelNotFound("m"), "NOT_FOUND"), (FileNotFoundError("f"), "NOT_FOUND"),
    (errors.AlreadyExists("o"), "ALREADY_EXISTS"), (FileExistsError("o"), "ALREADY_EXISTS"),
    (errors.QueueFull("q"), "RESOURCE_EXHAUSTED"),
    (errors.ShuttingDown("s"), "UNAVAILABLE"), (errors.Unavailable("u"), "UNAVAILABLE"),
    (errors.DeadlineExceeded("d"), "DEADLINE_EXCEEDED"),
    (errors.Cancelled(), "CANCELLED"),
    (KeyError("k"), "INTERNAL"), (RuntimeError("r"), "INTERNAL"), (PermissionError("p"), "INTERNAL"),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v)
def test_each_error_has_its_status(error, status):
    assert status_of(error) == status


def test_every_core_error_is_in_the_table_and_every_status_is_a_grpc_code():
    defined = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, BaseException)
               and v.__module__ == errors.__name__]
    assert all(status_of(cls.__new__(cls)) != errors.INTERNAL for cls in defined)
    assert all(grpc.StatusCode[name] for _, name in errors.STATUS)


def test_the_modules_that_raise_them_use_the_same_classes():
    from internlm_core import batching, checkpoint, config, engine, engine_api, tokenizer

    assert engine_api.AdapterNotFound is errors.AdapterNotFound and engine.PromptTooLong is errors.PromptTooLong
    assert batching.QueueFull is errors.QueueFull
    assert checkpoint.CheckpointError is errors.CheckpointError and config.ConfigError is errors.ConfigError
    assert tokenizer.TokenizerError is errors.TokenizerError
