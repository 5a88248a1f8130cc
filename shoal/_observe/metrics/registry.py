"""This process's metrics: families of labelled children, kept as plain numbers.

Recording is a float addition on a cached child, or for a histogram an append to its
list of values, counted into buckets in bulk (:class:`HistogramChild`); no lock per
record: shoal's own metrics are recorded on the event loop that owns them; users'
custom metrics, which any thread may record, take a lock, and so does a histogram's
fold. prometheus_client is used only to export (see ``store.py``): its own metric
objects cost about 1 us per ``inc`` on a lock, ours about 0.05 us.

A snapshot of the registry is plain tuples (``FamilyData``), which travel in a
``MetricsReport`` and merge with other processes' in the controller.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from shoal._errors import ConfigError
from shoal._observe.appended import take

Kind = Literal["counter", "gauge", "histogram"]
#: One exported sample: (sample name, ((label, value), ...), value).
Sample = tuple[str, tuple[tuple[str, str], ...], float]
#: One family as it travels and merges: (name, kind, help, samples).
FamilyData = tuple[str, str, str, list[Sample]]

#: Ray Serve's DEFAULT_LATENCY_BUCKET_MS (request and processing latency histograms).
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000, 5000,
    10000, 60000, 120000, 300000, 600000,
)  # fmt: skip
#: Values a histogram's child keeps before it counts them into their buckets: enough for
#: a sort to cost a few times less per value than a search each, and under 40 KB.
FOLD_AT = 1024


class CounterChild:
    """One labelled counter: only goes up."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild:
    """One labelled gauge: set, or moved up and down."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class WatchedGauge:
    """A gauge whose value is read from a function when exported: nothing to record."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], float]) -> None:
        self.fn = fn

    @property
    def value(self) -> float:
        return float(self.fn())


class HistogramChild:
    """One labelled histogram: a count per bucket (not cumulative until exported).

    ``observe`` only appends the value to ``values``: the values are counted into their
    buckets in bulk by :meth:`fold` (a sort, then a search per bound, rather than a
    search per value), once ``FOLD_AT`` of them wait, and by every reader, which folds
    before it reads ``counts`` and ``sum``. Any thread may observe (an append is atomic)
    or fold (folds take ``lock``); a value appended during a fold waits for the next."""

    __slots__ = ("bounds", "counts", "lock", "sum", "values")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.values: list[float] = []
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        values = self.values
        values.append(value)
        if len(values) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Count the values observed so far into ``counts`` and ``sum``."""
        with self.lock:
            taken = take(self.values)
            if not taken:
                return
            count = len(taken)
            total = sum(taken)
            self.sum += total
            counts = self.counts
            if total != total:  # a NaN among them: sorting would not order the others
                for value in taken:  # a value equal to a bound is in its bucket (le=)
                    counts[bisect_left(self.bounds, value)] += 1
                return
            taken.sort()
            below = 0
            for index, bound in enumerate(self.bounds):
                upto = bisect_right(taken, bound, below)  # the values <= bound
                counts[index] += upto - below
                below = upto
            counts[-1] += count - below


class CountOf:
    """A counter child that counts what a histogram child observed (plus any ``inc``): a
    request counted and timed pays for one update, the histogram's."""

    __slots__ = ("extra", "histogram")

    def __init__(self, histogram: HistogramChild) -> None:
        self.histogram = histogram
        self.extra = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.extra += amount

    @property
    def value(self) -> float:
        self.histogram.fold()
        return float(sum(self.histogram.counts)) + self.extra


Child = CounterChild | GaugeChild | HistogramChild | CountOf


class Family:
    """A metric and its children, one per combination of label values (cached)."""

    def __init__(
        self,
        name: str,
        kind: Kind,
        help: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...] = (),
    ) -> None:
        self.name = name
        self.kind = kind
        self.help = help
        self.labelnames = labelnames
        self.buckets = buckets
        self.children: dict[tuple[str, ...], Any] = {}
        self.lock = threading.Lock()  # creating a child: any thread may ask for one

    def labels(self, *values: str) -> Any:
        """The child for these label values (in ``labelnames`` order), created once.

        Callers on a hot path keep the child (or a dict of them) rather than calling
        this per request."""
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ConfigError(
                    f"metric {self.name!r} has labels {list(self.labelnames)}; "
                    f"got {len(values)} values {list(values)}: pass one value per label"
                )
            with self.lock:
                child = self.children.get(values)
                if child is None:
                    child = self._new_child()
                    self.children[values] = child
        return child

    def remove(self, *values: str) -> None:
        """Forget one child (a replica that stopped: its gauge must not linger)."""
        self.children.pop(values, None)

    def watch(self, fn: Callable[[], float], *values: str) -> None:
        """A gauge's child whose value is ``fn()`` at export (replacing any child of these
        values): a count the caller keeps anyway costs nothing more per request.
        ``fn`` runs in the thread that exports (the owner's event loop for reports)."""
        if self.kind != "gauge" or len(values) != len(self.labelnames):
            raise ConfigError(
                f"metric {self.name!r}: only a gauge can watch a function, with one value "
                f"per label {list(self.labelnames)}; got a {self.kind} and {list(values)}"
            )
        self.children[values] = WatchedGauge(fn)

    def count_of(self, histogram: Any, *values: str) -> Any:
        """A counter's child that counts what ``histogram`` (a histogram's child) observes:
        nothing more to record per event. A null child when ``histogram`` is one."""
        if self.kind != "counter" or len(values) != len(self.labelnames):
            raise ConfigError(
                f"metric {self.name!r}: only a counter can count a histogram's observations, "
                f"with one value per label {list(self.labelnames)}; got a {self.kind} and "
                f"{list(values)}"
            )
        if type(histogram) is not HistogramChild:
            return self.labels(*values)
        with self.lock:
            child = self.children.get(values)
            if type(child) is not CountOf or child.histogram is not histogram:
                extra = child.value if child is not None else 0.0
                child = CountOf(histogram)
                histogram.fold()
                child.extra = extra - sum(histogram.counts)
                self.children[values] = child
        return child

    def _new_child(self) -> Child:
        if self.kind == "counter":
            return CounterChild()
        if self.kind == "gauge":
            return GaugeChild()
        return HistogramChild(self.buckets)

    def data(self) -> FamilyData:
        """This family's samples, as Prometheus exports them."""
        samples: list[Sample] = []
        names = self.labelnames
        for values, child in list(self.children.items()):
            labels = tuple(zip(names, values, strict=True))
            if self.kind == "counter":
                samples.append((self.name + "_total", labels, child.value))
            elif self.kind == "gauge":
                samples.append((self.name, labels, child.value))
            else:
                samples.extend(_histogram_samples(self.name, labels, child))
        return (self.name, self.kind, self.help, samples)


def _histogram_samples(
    name: str, labels: tuple[tuple[str, str], ...], child: HistogramChild
) -> Iterable[Sample]:
    child.fold()
    total = 0
    for bound, count in zip(child.bounds, child.counts, strict=False):
        total += count
        yield (name + "_bucket", (*labels, ("le", _le(bound))), float(total))
    total += child.counts[-1]
    yield (name + "_bucket", (*labels, ("le", "+Inf")), float(total))
    yield (name + "_count", labels, float(total))
    yield (name + "_sum", labels, child.sum)


def _le(bound: float) -> str:
    # prometheus_client's spelling of a bucket bound (1.0, 0.5, ...), so that merged
    # samples of every process share one "le" value.
    return repr(float(bound))


class Registry:
    """Every metric family of this process, by name."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self._lock = threading.Lock()
        #: Functions whose families are computed when collected (the controller's view
        #: of its replicas): nothing to update when the state they read changes.
        self.collectors: list[Callable[[], list[FamilyData]]] = []

    def family(
        self,
        name: str,
        kind: Kind,
        help: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = (),
    ) -> Family:
        """The family ``name``, created at the first call; later calls must agree on its
        kind, labels and buckets (a metric has one shape in a process)."""
        labels = tuple(labelnames)
        bounds = tuple(float(b) for b in buckets)
        family = self.families.get(name)
        if family is None:
            with self._lock:
                family = self.families.get(name)
                if family is None:
                    family = Family(name, kind, help, labels, bounds)
                    self.families[name] = family
        if family.kind != kind or family.labelnames != labels or family.buckets != bounds:
            raise ConfigError(
                f"metric {name!r} is already defined as a {family.kind} with labels "
                f"{list(family.labelnames)}; it cannot also be a {kind} with labels "
                f"{list(labels)}: use another name"
            )
        return family

    def data(self) -> list[FamilyData]:
        data = [family.data() for family in list(self.families.values())]
        for collect in list(self.collectors):
            data += collect()
        return data


class NullChild:
    """What a disabled process records into: nothing."""

    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        pass

    def dec(self, amount: float = 1.0) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


NULL_CHILD = NullChild()


class NullFamily:
    """A family of a process whose metrics are disabled: every child is ``NULL_CHILD``."""

    __slots__ = ()

    def labels(self, *values: str) -> Any:
        return NULL_CHILD

    def remove(self, *values: str) -> None:
        pass

    def watch(self, fn: Callable[[], float], *values: str) -> None:
        pass

    def count_of(self, histogram: Any, *values: str) -> Any:
        return NULL_CHILD


NULL_FAMILY = NullFamily()
