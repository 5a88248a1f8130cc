"""``from shoal.serve import metrics``: Ray Serve's ``ray.serve.metrics`` (custom metrics
a deployment defines; they appear on the admin API's ``/metrics``: docs/metrics.md)."""

from shoal._observe.metrics.custom import Counter, Gauge, Histogram

__all__ = ["Counter", "Gauge", "Histogram"]
