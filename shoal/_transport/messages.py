"""Typed messages exchanged between shoal processes.

Each message is a slotted dataclass. On the wire it travels as the tuple
``(tag, *fields)`` (see :mod:`shoal._transport.codec`), which pickles several
times faster than the dataclass itself. Replies are correlated with their
request by the frame's correlation id, not by a field.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, dataclass_transform

from shoal._config import NO_REPLICA_TIMEOUT_S

if TYPE_CHECKING:
    from shoal._transport.client import NodeNetwork

_REGISTRY: dict[int, type[Message]] = {}
#: Wire tag -> message class (``codec.decode`` rebuilds a message from it without a call).
MESSAGE_TYPES = _REGISTRY
_M = TypeVar("_M", bound="Message")


class Message:
    """Base of every wire message; subclasses are declared with :func:`message`."""

    __slots__ = ()
    tag: ClassVar[int]
    #: ``message._wire(message)`` is its wire tuple: for a message with fields, one C call
    #: (``attrgetter("tag", *fields)``), cheaper than a method (codec.encode calls it).
    _wire: ClassVar[Any]

    def to_wire(self) -> tuple[Any, ...]:
        wire: tuple[Any, ...] = self._wire(self)
        return wire


@dataclass_transform()
def message(tag: int) -> Callable[[type[_M]], type[_M]]:
    """Declare a slotted dataclass message with a unique wire ``tag``."""

    def declare(cls: type[_M]) -> type[_M]:
        cls = dataclass(slots=True)(cls)
        if tag in _REGISTRY:
            raise RuntimeError(f"message tag {tag} used twice")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        cls.tag = tag
        cls._wire = attrgetter("tag", *names) if names else functools.partial(_tag_only, (tag,))
        _REGISTRY[tag] = cls
        return cls

    return declare


def _tag_only(wire: tuple[int], _message: Message) -> tuple[int]:
    return wire


def from_wire(data: tuple[Any, ...]) -> Message:
    """Rebuild a message from its wire tuple."""
    return _REGISTRY[data[0]](*data[1:])


# --- data plane: caller <-> replica -------------------------------------------------


@message(1)
class Request(Message):
    """Call ``method`` on a replica. ``stream`` asks for StreamItem replies.

    ``remaining_s``: the seconds the request had left before its deadline when it was
    sent (relative, so that no two machines need to share a clock), or None when it
    has no deadline. The replica counts it down from the moment it receives it.

    ``priority``: the request's class, by rank (an index into
    ``shoal._router.queue.PRIORITIES``: 0 high, 1 normal, 2 low); routers serve the
    waiting requests of a higher class first. A small int keeps the wire cheap.

    ``traceparent``: the W3C traceparent of the caller's span (the parent of the
    replica's), or "" when tracing is off (``shoal._observe.tracing``).
    """

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    request_id: str = ""
    stream: bool = False
    multiplexed_model_id: str = ""
    remaining_s: float | None = None
    priority: int = 1
    traceparent: str = ""


@message(2)
class Result(Message):
    """The successful return value of a request or a control operation."""

    value: Any = None


@message(3)
class Failure(Message):
    """A request failed. ``exception`` is the pickled exception when it could be pickled."""

    type_name: str
    message: str
    traceback: str
    exception: bytes | None = None
    kind: str = "user"  # "user": raised by user code; otherwise a shoal error class name


@message(4)
class StreamItem(Message):
    value: Any


@message(5)
class StreamEnd(Message):
    pass


@message(6)
class StreamCredit(Message):
    """The consumer of a stream may receive ``items`` more items (back-pressure)."""

    items: int


@message(8)
class StreamInput(Message):
    """A message from the caller into a running stream (a websocket's client messages)."""

    value: Any


@message(7)
class Cancel(Message):
    """Cancel the request with the frame's correlation id."""


# --- control plane: controller <-> worker processes ---------------------------------


@message(20)
class Hello(Message):
    worker_id: str
    pid: int


@dataclass(slots=True)
class ReplicaInfo:
    """What a router needs to reach one replica, and where it runs.

    ``node_id`` names the machine (or Ray node) hosting the replica, so that routers
    can prefer nearby replicas; "" when the runtime does not say. ``address`` is the
    replica's Unix socket; ``tcp_address`` ("host:port", "[v6]:port") is where routers
    on other nodes reach it (authenticated: ``shoal._transport.auth``), "" when it
    listens only on its Unix socket.
    """

    replica_id: str
    address: str
    max_ongoing_requests: int
    node_id: str = ""
    tcp_address: str = ""

    def __reduce__(self) -> tuple[Any, ...]:
        # Its fields as a tuple: a slotted dataclass's default pickling (copyreg, a dict of
        # field names per object) made a 100-replica set 1.7x slower to encode, 3.5x slower
        # to decode and 16% larger (docs/scaling.md). Every field must be here
        # (tests/test_scale.py checks).
        fields = (self.replica_id, self.address, self.max_ongoing_requests, self.node_id)
        return ReplicaInfo, (*fields, self.tcp_address)


@dataclass(slots=True)
class ReplicaStarted:
    """A worker's answer to StartReplica: where its replica is reached, and the installed
    modules the replica's start imported (``shoal._runtime.process.learned``)."""

    info: ReplicaInfo
    imported: list[str]


@message(21)
class ReplicaSetUpdate(Message):
    """The full replica set of one deployment; ``exists=False`` means it was deleted.

    ``ingress`` says whether the deployment is its application's ingress, so that
    ``serve.get_app_handle`` works in every process, not only the driver. The two
    limits are the deployment's options every router applies on its own.
    ``metrics_interval_s`` > 0 asks routers to report their load every that many
    seconds (the deployment autoscales); 0: they report nothing.
    """

    app: str
    deployment: str
    replicas: list[ReplicaInfo]
    exists: bool = True
    ingress: bool = False
    max_queued_requests: int = -1
    no_replica_timeout_s: float = NO_REPLICA_TIMEOUT_S
    metrics_interval_s: float = 0.0


@message(22)
class StartReplica(Message):
    """Construct a replica. ``spec`` is the pickled ReplicaSpec (controller-trusted); its
    user code stays a blob until the worker has set up the paths to import it."""

    spec: bytes


@message(23)
class Reconfigure(Message):
    user_config: Any


@message(24)
class HealthCheck(Message):
    """Run the replica's ``check_health``; replies with its status details (a dict of
    JSON values, or None: see ``shoal._replica.details``), so they cost no extra trip."""


@message(25)
class StopReplica(Message):
    """Stop taking requests, wait for ongoing ones up to ``timeout_s``, then exit."""

    wait_loop_s: float
    timeout_s: float


@message(26)
class StartProxy(Message):
    """Serve HTTP with ``http_options``: on the listening socket the process inherited,
    or else on one it binds, with ``SO_REUSEPORT`` if ``reuse_port`` (a Ray node's
    proxy: the nodes of a one-machine cluster share the port)."""

    http_options: dict[str, Any]
    reuse_port: bool = False


@message(27)
class RoutesUpdate(Message):
    """Route prefix -> (app name, ingress deployment name)."""

    routes: dict[str, tuple[str, str]] = field(default_factory=dict)


@message(28)
class DrainProxy(Message):
    """Shoal is shutting down: the proxy fails health checks and answers new requests 503."""


@message(29)
class Ping(Message):
    """Answered by a worker's event loop itself, without running user code: liveness only."""


@message(30)
class ProxyIdle(Message):
    """Reply once no request the proxy accepted is still in flight, or after ``timeout_s``;
    the reply's value is how many are still in flight."""

    timeout_s: float


@message(31)
class LoadReport(Message):
    """A process's routers' load on one autoscaled deployment, averaged over the
    ``period_s`` before it was sent: requests waiting in the router (``queued``) and
    requests sent to each replica and not yet answered (``running``, by replica id).
    Sent unsolicited to the controller (no reply); ``source`` names the process."""

    app: str
    deployment: str
    source: str
    queued: float
    running: dict[str, float]
    period_s: float


@message(32)
class AutoscalingStats(Message):
    """Replies with the replica's ``record_autoscaling_stats()`` (a dict of floats),
    or None when its deployment defines no such method."""

    timeout_s: float


@message(33)
class ConfigureProcess(Message):
    """The instance's observability settings (``shoal._observe.options.Telemetry``, as a
    dict); sent to every worker process right after its hello, before anything else.

    ``network``: for a process of this node on an instance whose replicas span nodes
    (the Ray runtime's proxy), its node and the instance secret, so that its routers
    reach replicas on other nodes over authenticated TCP. Only ever sent over a Unix
    socket: the secret never crosses the network in a message."""

    telemetry: dict[str, Any]
    network: NodeNetwork | None = None


@message(34)
class MetricsReport(Message):
    """A process's metrics and recent request failures, sent unsolicited to the controller
    (no reply) every ``report_interval_s``; ``source`` names the process (its worker id).

    ``families``: ``(name, type, help, [(sample name, ((label, value), ...), value)])``
    per metric family; ``recent_errors``: ``(unix time, application, deployment, replica,
    request_id, error type, message, traceback)`` per failure, oldest first. Plain
    tuples (see ``shoal._observe.metrics``): cheap to pickle, no class to import.
    """

    source: str
    families: list[tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]
    recent_errors: list[tuple[float, str, str, str, str, str, str, str]]


# --- admin: a process attached to an instance -> that instance's control plane ------
# Peers are same-user processes (SO_PEERCRED on the instance's admin socket).


@message(60)
class AttachDeploy(Message):
    """Deploy (or update) applications; ``apps`` is a pickled list of AppSpec whose user
    code stays pickled (the instance never imports it). Replies once they serve."""

    apps: bytes


@message(61)
class AttachDelete(Message):
    name: str


@message(62)
class AttachStatus(Message):
    """Replies with the instance's ServeStatus."""


@message(63)
class AttachApps(Message):
    """Replies with {application name: its ingress deployment}."""


@message(64)
class AttachShutdown(Message):
    """Shut the instance down (as ``serve.shutdown()`` does in Ray Serve)."""


@message(65)
class Rejoin(Message):
    """A worker whose controller went away says hello to its successor (``shoal start``
    restarted after a crash), with what it hosts so it can be adopted: a replica
    (``replica`` with its app, deployment, code version and user_config) or the
    proxy (``proxy``: where it listens); neither for an idle standby process."""

    worker_id: str
    pid: int
    replica: ReplicaInfo | None = None
    app: str = ""
    deployment: str = ""
    code_version: str = ""
    user_config: Any = None
    proxy: tuple[str, int] | None = None
