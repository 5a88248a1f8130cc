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
#: thousand objects, so at 700 the count of new objects crossed the threshold every ~60
#: requests, and each collection (0.5 ms) found nothing to free: 5-8% of the proxy's CPU
#: at 64 connections, measured with ``gc.callbacks``. At 10,000 it crossed it once in
#: 60,000 requests. Cyclic garbage, which only a collection frees, still is, later. The
#: proxy runs only shoal's code: no user code's collections change.
YOUNG_THRESHOLD = 10_000


def main() -> None:
    """The worker's main (which freezes the imports' objects) with the proxy's young
    generation threshold (the fork server calls this)."""
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    worker.main()


if __name__ == "__main__":
    preload()
    main()
