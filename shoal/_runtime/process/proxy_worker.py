"""Entry point of a proxy's worker process: the worker, with the proxy's modules
(uvicorn included) imported before it says hello.

``python -m shoal._runtime.process.proxy_worker INSTANCE_DIR WORKER_ID``

A standby proxy process (see ``ProcessRuntime._launch_proxy``) then only has
to bind its inherited socket and start serving when the proxy it stands in for
dies: about 50 ms instead of a few hundred.
"""

from __future__ import annotations

from shoal._proxy.proxy import preload
from shoal._runtime.process.worker import main

if __name__ == "__main__":
    preload()
    main()
