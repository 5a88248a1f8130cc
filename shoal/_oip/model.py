"""``@oip.model(...)``: a deployment class served under the Open Inference Protocol.

The decorator records the model's metadata on the class and gives it a ``__call__``
that serves the protocol's REST paths (``shoal._oip.rest``): the proxy forwards each
request to the deployment's replica as for any HTTP ingress, and the replica decodes
the v2 request and calls the model's ``infer`` method in the same process (no extra
hop). ``serve.run`` serves it under ``/v2/models/{name}`` unless told otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal._errors import ConfigError
from shoal._oip.tensors import DATATYPES

#: The class attribute holding a model's :class:`ModelSpec`.
SPEC_ATTRIBUTE = "__shoal_oip__"
#: The class attribute ``serve.run`` reads for an application's default route prefix.
ROUTE_PREFIX_ATTRIBUTE = "__shoal_route_prefix__"
_ASGI_ATTRIBUTE = "__shoal_asgi_app__"  # shoal._api.ingress.ASGI_APP_ATTRIBUTE
#: Route prefixes under which models are served by default; the proxy answers the
#: server-level paths (/v2, /v2/health/...) once an application is routed below it.
MODELS_PREFIX = "/v2/models/"
#: The methods ``@oip.model`` adds for gRPC (``shoal._oip.grpc_methods``), named like the RPCs.
GRPC_METHODS = ("ModelInfer", "ModelMetadata", "ModelReady")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output of a model: its name, datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a tensor's name must be a non-empty string, got {self.name!r}")
        if self.datatype not in DATATYPES:
            raise ConfigError(
                f"tensor '{self.name}' has datatype {self.datatype!r}; use one of "
                f"{', '.join(DATATYPES)}"
            )
        shape = tuple(self.shape)
        if not all(type(dim) is int and dim >= -1 for dim in shape):
            raise ConfigError(
                f"tensor '{self.name}' has shape {self.shape!r}; use a list of sizes "
                "(non-negative integers, or -1 for any size)"
            )
        object.__setattr__(self, "shape", shape)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What ``@oip.model`` recorded: the metadata the protocol shows and how to call the model."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    method: str
    multiplexed: bool
    #: Keyword arguments the model's method accepts: "parameters", "version".
    extras: frozenset[str] = frozenset()
    #: Declared inputs by name; declared outputs' datatypes by name (looked up per request).
    input_map: dict[str, TensorSpec] = field(init=False, compare=False, repr=False)
    output_types: dict[str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_map", {tensor.name: tensor for tensor in self.inputs})
        types = {tensor.name: tensor.datatype for tensor in self.outputs}
        object.__setattr__(self, "output_types", types)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [tensor.metadata() for tensor in self.inputs],
            "outputs": [tensor.metadata() for tensor in self.outputs],
        }

    @property
    def default_version(self) -> str:
        return self.versions[-1] if self.versions else ""


def model(
    name: str,
    *,
    versions: Sequence[str] = ("1",),
    platform: str = "shoal",
    inputs: Sequence[TensorSpec] = (),
    outputs: Sequence[TensorSpec] = (),
    method: str = "infer",
    multiplexed: bool = False,
) -> Callable[[type], type]:
    """Serve the decorated class under the Open Inference Protocol, as model ``name``.

    Put it under ``@serve.deployment``. The class's ``method`` (``infer`` by default, sync
    or async) receives the request's inputs as ``{name: numpy array}`` and returns its
    outputs as ``{name: array-like}`` (or one array-like when one output is declared). It
    may also take ``parameters`` (the request's parameters) and ``version`` (the version
    the request named, or the last of ``versions``) as keyword arguments.

    ``inputs``/``outputs``: the tensors the model declares (metadata; requests are checked
    against declared inputs). ``multiplexed=True``: the version in a request's path becomes
    its multiplexed model id (``serve.get_multiplexed_model_id()``), and any version is
    accepted (a ``@serve.multiplexed`` loader loads it). docs/oip.md is the guide.
    """
    spec = _spec(name, versions, platform, inputs, outputs, method, multiplexed)

    def decorate(cls: type) -> type:
        target = _method_to_call(cls, spec)
        final = _with_extras(spec, target)
        added = _protocol_methods(inspect.iscoroutinefunction(target))
        for method_name, function in added.items():
            setattr(cls, method_name, function)
        setattr(cls, SPEC_ATTRIBUTE, final)
        setattr(cls, ROUTE_PREFIX_ATTRIBUTE, MODELS_PREFIX + final.name)
        return cls

    return decorate


def _method_to_call(cls: type, spec: ModelSpec) -> Callable[..., Any]:
    """``cls``'s method ``spec.method``; a ConfigError if @oip.model cannot serve ``cls``."""
    if not inspect.isclass(cls):
        raise ConfigError(
            f"@oip.model decorates a class (put it under @serve.deployment), got {cls!r}"
        )
    if getattr(cls, _ASGI_ATTRIBUTE, None) is not None:
        raise ConfigError(
            f"{cls.__qualname__} is a @serve.ingress class: an OIP model serves the "
            "protocol's paths itself; use one of the two"
        )
    for taken in ("__call__", *GRPC_METHODS):
        if taken in vars(cls):
            raise ConfigError(
                f"{cls.__qualname__} defines {taken}, which @oip.model needs to serve the "
                f"protocol; name the model's method '{spec.method}' (or pass method=...)"
            )
    target = getattr(cls, spec.method, None)
    if not callable(target):
        raise ConfigError(
            f"{cls.__qualname__} has no method '{spec.method}' for @oip.model to call; "
            "define it (it receives {input name: numpy array}) or pass method=..."
        )
    return target


def _protocol_methods(is_async: bool) -> dict[str, Callable[..., Any]]:
    """The REST and gRPC methods @oip.model adds, by name (the async ones if ``is_async``)."""
    from shoal._oip import grpc_methods, rest

    return {
        "__call__": rest.serve_async if is_async else rest.serve_sync,
        "ModelInfer": (
            grpc_methods.model_infer_async if is_async else grpc_methods.model_infer_sync
        ),
        "ModelMetadata": grpc_methods.model_metadata,
        "ModelReady": grpc_methods.model_ready,
    }


def _spec(
    name: Any, versions: Any, platform: Any, inputs: Any, outputs: Any, method: Any,
    multiplexed: Any,
) -> ModelSpec:  # fmt: skip
    if not isinstance(name, str) or not name or "/" in name or "{" in name or "}" in name:
        raise ConfigError(
            f"@oip.model's name must be a non-empty string without '/', '{{' or '}}', got {name!r}"
        )
    if isinstance(versions, str) or not all(
        isinstance(v, str) and v and "/" not in v for v in versions
    ):
        raise ConfigError(
            f"@oip.model's versions must be a list of non-empty strings without '/', "
            f"got {versions!r}"
        )
    for what, tensors in (("inputs", inputs), ("outputs", outputs)):
        if not all(isinstance(tensor, TensorSpec) for tensor in tensors):
            raise ConfigError(
                f"@oip.model's {what} must be oip.TensorSpec objects, got {tensors!r}"
            )
        names = [tensor.name for tensor in tensors]
        if len(set(names)) != len(names):
            raise ConfigError(f"@oip.model's {what} name a tensor twice: {names}")
    if not isinstance(platform, str):
        raise ConfigError(f"@oip.model's platform must be a string, got {platform!r}")
    if not isinstance(method, str) or not method.isidentifier():
        raise ConfigError(f"@oip.model's method must be a method name, got {method!r}")
    if not isinstance(multiplexed, bool):
        raise ConfigError(f"@oip.model's multiplexed must be True or False, got {multiplexed!r}")
    return ModelSpec(
        name, tuple(versions), platform, tuple(inputs), tuple(outputs), method, multiplexed
    )


def _with_extras(spec: ModelSpec, method: Callable[..., Any]) -> ModelSpec:
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return spec
    extras = frozenset(name for name in ("parameters", "version") if name in parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        extras = frozenset(("parameters", "version"))
    return ModelSpec(
        spec.name, spec.versions, spec.platform, spec.inputs, spec.outputs, spec.method,
        spec.multiplexed, extras,
    )  # fmt: skip


def spec_of(instance: Any) -> ModelSpec:
    spec = getattr(type(instance), SPEC_ATTRIBUTE, None)
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"{type(instance).__qualname__} is not an @oip.model class")
    return spec
