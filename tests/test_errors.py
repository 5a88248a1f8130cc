"""Errors a user can act on: one hierarchy, and remote tracebacks that show the user's code once."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
from typing import Any

import pytest
from conftest import Deploy, run_driver

import shoal
from shoal import _errors, serve

DRIVER = """
import sys
import traceback

from shoal import serve


def check(x):
    raise ValueError(f"bad input {x}")  # RAISE


@serve.deployment
class Inner:
    def __call__(self, x):
        return check(x)  # INNER


@serve.deployment
class Outer:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, x):
        return await self.inner.remote(x)  # OUTER


@serve.deployment
class Broken:
    def __init__(self):
        raise RuntimeError("weights not found")  # CONSTRUCTOR


if __name__ == "__main__":
    local = sys.argv[2] == "local"
    if not local:
        serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
    handle = serve.run(Outer.bind(Inner.bind()), route_prefix=None, _local_testing_mode=local)
    try:
        handle.remote(3).result(timeout_s=60)
    except ValueError as exc:
        print("".join(traceback.format_exception(exc)))
    print("=== constructor")
    try:
        serve.run(Broken.bind(), name="broken", route_prefix=None, _local_testing_mode=local)
    except RuntimeError as exc:  # DeploymentError; in local mode the constructor's own (as Ray)
        print(str(exc))
        print("=== unhandled")
        print("".join(traceback.format_exception(exc)))
    serve.shutdown()
"""


def _line(marker: str) -> tuple[int, str]:
    """The line number in DRIVER of the line ending with ``# marker``, and its text."""
    for number, text in enumerate(DRIVER.splitlines(), start=1):
        if text.endswith(f"# {marker}"):
            return number, text.strip()
    raise AssertionError(marker)


@pytest.fixture(scope="module", params=["process", "local"])
def driver_output(request: pytest.FixtureRequest, tmp_path_factory: Any) -> tuple[str, str]:
    """(path of the driver script, what it printed), once per runtime."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    result = run_driver(tmp_path, DRIVER, request.param)
    return str(tmp_path / "driver.py"), result.stdout


def test_remote_traceback_shows_each_user_frame_once_with_its_source(
    driver_output: tuple[str, str],
) -> None:
    script, output = driver_output
    text = output.split("=== constructor")[0]
    for marker, function in [("RAISE", "check"), ("INNER", "__call__"), ("OUTER", "__call__")]:
        number, source = _line(marker)
        assert text.count(f'File "{script}", line {number}, in {function}') == 1, text
        assert text.count(source) == 1, text
    assert text.count("ValueError: bad input 3") == 1, text
    assert "<dynamic-code>" not in text
    # Outermost first: the driver, then the outer replica, then the inner one.
    assert text.index(_line("OUTER")[1]) < text.index(_line("INNER")[1]) < text.index("# RAISE")


def test_constructor_error_names_the_line_once_and_stays_short(
    driver_output: tuple[str, str],
) -> None:
    script, output = driver_output
    message, unhandled = output.split("=== constructor")[1].split("=== unhandled")
    number, source = _line("CONSTRUCTOR")
    # Printed unhandled: the constructor's source line appears once (not again in the cause).
    assert unhandled.count(f'File "{script}", line {number}, in __init__') == 1, unhandled
    assert unhandled.count(source) == 1, unhandled
    assert len(unhandled.strip().splitlines()) <= 25, unhandled
    if "local" in script:  # local testing mode raises the constructor's own exception, as Ray
        assert message.strip() == "weights not found"
        assert unhandled.count("RuntimeError: weights not found") == 1, unhandled
        return
    assert "deployment 'Broken' raised RuntimeError: weights not found" in message
    assert message.count(f'File "{script}", line {number}, in __init__') == 1, message
    assert message.count(source) == 1, message
    assert len(message.strip().splitlines()) <= 8, message
    assert unhandled.count("RuntimeError: weights not found") == 2, unhandled  # cause, message


# --- typed errors cross process boundaries with their attributes ------------------------------


MISSING_X = {"loc": ["body", "x"], "msg": "field required", "type": "missing"}


@serve.deployment
class Raiser:
    def __call__(self, kind: str) -> None:
        if kind == "publish":
            raise _errors.PublishError("replica r1 did not confirm", generation=7)
        if kind == "quorum":
            raise _errors.QuorumError("1 of 3 answered", {"b": "TimeoutError"}, ["a"])
        if kind == "input":
            raise _errors.InvalidInputError([MISSING_X])
        if kind == "backpressure":
            raise _errors.BackPressureError(num_queued_requests=4, max_queued_requests=4)
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "error_type", "attributes"),
    [
        ("publish", _errors.PublishError, {"generation": 7}),
        ("quorum", _errors.QuorumError, {"failed": {"b": "TimeoutError"}, "responded": ["a"]}),
        ("input", _errors.InvalidInputError, {"errors": [MISSING_X]}),
        ("backpressure", _errors.BackPressureError, {"max_queued_requests": 4}),
    ],
)
def test_shoal_errors_raised_in_a_replica_keep_their_type_and_attributes(
    deploy: Deploy, kind: str, error_type: type[Exception], attributes: dict[str, Any]
) -> None:
    handle = deploy(Raiser.bind())
    with pytest.raises(error_type) as info:
        handle.remote(kind).result(timeout_s=30)
    assert isinstance(info.value, serve.ShoalError)
    for name, value in attributes.items():
        assert getattr(info.value, name) == value


def test_shoal_error_raised_outside_user_code_is_just_its_message(deploy: Deploy) -> None:
    handle = deploy(Raiser.bind())
    with pytest.raises(serve.NotFoundError, match="'nope'") as info:
        handle.nope.remote().result(timeout_s=30)
    assert not getattr(info.value, "__notes__", None)  # no traceback of shoal's internals


# --- one hierarchy ----------------------------------------------------------------------------


def _public_exception_classes() -> dict[str, type[BaseException]]:
    """Every public exception class defined in a shoal module, by qualified name."""
    found = {}
    for module_info in pkgutil.walk_packages(shoal.__path__, "shoal."):
        if module_info.name == "shoal.__main__":
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_public_error_class_lives_in_errors_and_is_listed() -> None:
    classes = _public_exception_classes()
    elsewhere = sorted(name for name in classes if not name.startswith("shoal._errors."))
    assert elsewhere == [], "define every error class in shoal/_errors.py"
    assert set(_errors.__all__) >= {name.rsplit(".", 1)[1] for name in classes}
    assert _errors.__all__ == sorted(_errors.__all__)
    for name in _errors.__all__:
        assert issubclass(getattr(_errors, name), shoal.ShoalError), name


def test_errors_keep_their_builtin_bases_and_old_import_paths() -> None:
    import shoal.online
    import shoal.patterns
    from shoal._transport import codec
    from shoal.integrations import _mlflow_io

    assert issubclass(_errors.InvalidInputError, ValueError)
    assert issubclass(_errors.SerializationError, TypeError)
    assert issubclass(_errors.GenerationNotFoundError, LookupError)
    assert issubclass(_errors.SelectionError, LookupError)
    assert issubclass(_errors.FeedbackError, ValueError)
    assert shoal.patterns.QuorumError is _errors.QuorumError
    assert shoal.patterns.PatternError is _errors.PatternError
    assert shoal.online.PublishError is _errors.PublishError
    assert shoal.online.GenerationNotFoundError is _errors.GenerationNotFoundError
    assert _mlflow_io.InvalidInputError is _errors.InvalidInputError
    assert codec.SerializationError is _errors.SerializationError


def test_ray_serve_names() -> None:
    assert _errors.RayServeException is shoal.ShoalError  # `except RayServeException` catches all
    assert issubclass(_errors.DeploymentUnavailableError, serve.UnavailableError)
    error = _errors.BackPressureError(num_queued_requests=10, max_queued_requests=10)
    assert "max_queued_requests=10" in error.message and "retry later" in error.message
    copy = pickle.loads(pickle.dumps(_errors.BackPressureError(3, 2)))
    assert (copy.num_queued_requests, copy.max_queued_requests) == (3, 2)


def test_replica_error_survives_a_second_hop() -> None:
    error = _errors.ReplicaError("mod.Unpicklable", "it broke", "Remote traceback:\n  File x")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.remote_type, copy.remote_message, str(copy)) == (
        "mod.Unpicklable",
        "it broke",
        str(error),
    )
