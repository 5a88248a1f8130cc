"""Entry point of a proxy's worker process: the worker, with the proxy's modules
(uvicorn included) imported before it says hello.

``python -m shoal._runtime.process.proxy_worker INSTANCE_DIR WORKER_ID``

A standby proxy process (see ``ProcessRuntime._launch_proxy``) then only has
to bind its inherited socket and start serving when the proxy it stands in for
dies: about 50 ms instead of a few hundred.
"""

from __future__ import annotations

import gc

from shoal._proxy.proxy import preload
from shoal._runtime.process import worker

#: The proxy's young-generation threshold (Python's default: 700). What a proxy allocates
#: per request is freed by reference counting, but 64 requests in flight hold a few
#: thousand objects, so at 700 the count of new objects crosses the threshold every ~60
#: requests and each collection (0.5 ms) finds nothing to free: 5-8% of the proxy's CPU
#: at 64 connections, measured with ``gc.callbacks``. At 10,000 it crossed it once in
#: 60,000 requests; cyclic garbage, which only a collection frees, still is, later.
YOUNG_THRESHOLD = 10_000


def tune_collector() -> None:
    """Freeze what is allocated so far (modules, classes: a full collection then walks
    only what the proxy allocated since: 1 ms instead of 35) and raise the young
    generation's threshold to :data:`YOUNG_THRESHOLD`. The proxy runs only shoal's code,
    so this changes no user code's collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def main() -> None:
    """The worker's main, with the collector tuned (the fork server calls this)."""
    tune_collector()
    worker.main()


if __name__ == "__main__":
    preload()
    main()
