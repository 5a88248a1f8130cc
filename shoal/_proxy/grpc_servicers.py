"""The services the gRPC proxy serves: users' generated ``add_XServicer_to_server``
functions, shoal's built-in services, and the method handlers they declare.

A user's servicer function is called with a stand-in servicer and a stand-in server
that only records the method handlers it adds (their request deserializers and
whether they stream); the proxy serves those methods itself. A *built-in* service (a
function marked ``__shoal_grpc_builtin__``, e.g. the Open Inference Protocol's) is
called with the proxy's :class:`~shoal._proxy.grpc_proxy.GrpcIngress` and the real
``grpc.aio`` server, and adds its own handlers (contract: /docs/grpc.md, "Built-in
services").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal._errors import ConfigError
from shoal._seam.imports import import_attribute

#: The attribute that marks a servicer function as one of shoal's built-in services.
BUILTIN_MARKER = "__shoal_grpc_builtin__"


@dataclass(frozen=True, slots=True)
class UserMethod:
    """One RPC of a user's service, as its generated code declares it."""

    path: str  # "/package.Service/Method"
    name: str  # "Method": the ingress method it calls
    deserializer: Callable[[bytes], Any] | None
    request_streaming: bool
    response_streaming: bool


class _DummyServicer:
    """What a user's servicer function registers: any attribute (the handlers are the
    proxy's own)."""

    def __getattr__(self, name: str) -> None:
        return None


class _Recorder:
    """Stands in for the server given to a generated ``add_XServicer_to_server``."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}  # "/package.Service/Method" -> RpcMethodHandler

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for handler in handlers:
            methods = getattr(handler, "_method_handlers", None)  # grpc's dictionary handler
            if not isinstance(methods, dict):
                raise ConfigError(
                    f"the servicer function added a {type(handler).__name__}, not the method "
                    "handlers grpcio-tools generates: list only generated "
                    "add_XServicer_to_server functions in grpc_servicer_functions"
                )
            self.handlers.update(methods)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


def load_function(path: str) -> Callable[..., Any]:
    """The function an import path of ``grpc_servicer_functions`` names (``module.fn`` or
    ``module:fn``); ConfigError naming the path and why it cannot be used."""
    module, sep, attribute = path.partition(":")
    if not sep:
        module, _, attribute = path.rpartition(".")
    where = f"grpc_options.grpc_servicer_functions: {path!r}"
    try:
        function = import_attribute(module, attribute)
    except ImportError as exc:
        raise ConfigError(
            f"{where} cannot be imported ({exc}); the module must be importable where the "
            "proxy runs (the directory shoal started in, or PYTHONPATH)"
        ) from None
    except AttributeError:
        raise ConfigError(f"{where}: module '{module}' has no attribute '{attribute}'") from None
    if not callable(function):
        raise ConfigError(f"{where} is a {type(function).__name__}, not a function")
    return function


def user_methods(path: str, function: Callable[..., Any]) -> list[UserMethod]:
    """The RPCs a user's generated servicer function declares."""
    recorder = _Recorder()
    try:
        function(_DummyServicer(), recorder)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"grpc_options.grpc_servicer_functions: {path!r} failed when called as "
            f"add_XServicer_to_server(servicer, server): {type(exc).__name__}: {exc}"
        ) from None
    if not recorder.handlers:
        raise ConfigError(
            f"grpc_options.grpc_servicer_functions: {path!r} added no method: give the "
            "add_XServicer_to_server function of a _pb2_grpc module"
        )
    return [_method(full, handler) for full, handler in recorder.handlers.items()]


def _method(path: str, handler: Any) -> UserMethod:
    return UserMethod(
        path, path.rsplit("/", 1)[-1], handler.request_deserializer,
        bool(handler.request_streaming), bool(handler.response_streaming),
    )  # fmt: skip


def is_builtin(function: Callable[..., Any]) -> bool:
    return bool(getattr(function, BUILTIN_MARKER, False))
