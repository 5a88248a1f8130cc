"""Serve the examples side by side, each under its own route prefix.

Importing this module has no side effects: it only collects the examples'
bound applications in ``APPS`` (and, if scikit-learn is missing, logs that the
business-logic example is left out). ``main()`` starts serving::

    python -m examples.demo            # 127.0.0.1:8000, Ctrl-C to stop
    python -m examples.demo --port 8080
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import time

from examples import (
    business_logic,
    composed,
    ensemble,
    online_learning,
    patterns_bandit,
    patterns_ensemble,
    patterns_model_update,
    patterns_pipeline,
    patterns_selection,
    pipeline,
)
from shoal import serve
from shoal.serve import Application

#: (application name, route prefix, application) for every example that can run here.
APPS: list[tuple[str, str, Application]] = [
    ("composed", "/composed", composed.app),
    ("pipeline", "/pipeline", pipeline.app),
    ("ensemble", "/ensemble", ensemble.app),
    # The patterns guide (docs/patterns.md): one app per pattern, built from shoal.patterns.
    ("patterns-pipeline", "/patterns/pipeline", patterns_pipeline.app),
    ("patterns-ensemble", "/patterns/ensemble", patterns_ensemble.app),
    ("patterns-selection", "/patterns/selection", patterns_selection.app),
    ("patterns-shadow", "/patterns/shadow", patterns_model_update.shadow_app),
    ("patterns-canary", "/patterns/canary", patterns_model_update.app),
    ("patterns-bandit", "/patterns/bandit", patterns_bandit.app),
]

#: Examples left out of ``APPS``, with the reason.
SKIPPED: dict[str, str] = {}

# The business-logic example's model needs scikit-learn, an optional dependency.
# find_spec only looks for it: importing sklearn here would slow every import down.
if importlib.util.find_spec("sklearn") is not None:
    APPS.append(("business", "/business", business_logic.app))
else:
    SKIPPED["business"] = "scikit-learn is not installed (pip install scikit-learn)"
    # `shoal demo` iterates APPS itself: this message is how its users learn why.
    logging.getLogger(__name__).warning("demo: skipping 'business': %s", SKIPPED["business"])

# The online-learning example's trainer needs scikit-learn too (SGDClassifier).
if importlib.util.find_spec("sklearn") is not None:
    APPS.append(("online", "/online", online_learning.app))
else:
    SKIPPED["online"] = "scikit-learn is not installed (pip install scikit-learn)"
    logging.getLogger(__name__).warning("demo: skipping 'online': %s", SKIPPED["online"])

#: A request body that each example understands, used in the printed curl lines.
SAMPLE_BODIES: dict[str, str] = {
    "composed": "Hey!",
    "pipeline": '{"text": "I love it, great and fast!"}',
    "ensemble": '{"x": 2}',
    "business": '{"user_id": 1}',
    "patterns-pipeline": '{"description": "pointy ears, whiskers, four paws down"}',
    "patterns-ensemble": '{"description": "floppy ears, barks: woof"}',
    "patterns-selection": '{"animal": "cat", "description": "a small cat"}',
    "patterns-shadow": '{"description": "yip yip"}',
    "patterns-canary": '{"description": "meow"}',
    "patterns-bandit": '{"user_id": "ana"}',
    "online": '{"instances": [[0.5, -0.2]], "labels": [1]}',
}

#: What some examples need besides the body: a path under the prefix, and headers.
SAMPLE_PATHS: dict[str, str] = {"business": "/predict", "online": "/feedback"}
SAMPLE_HEADERS: dict[str, tuple[str, ...]] = {
    "business": (f"x-api-key: {business_logic.DEMO_API_KEY}", "content-type: application/json"),
    "online": ("content-type: application/json",),
}


def curl_command(base_url: str, name: str, route_prefix: str) -> str:
    """A copy-pasteable curl line that queries one example app."""
    headers = "".join(f" -H '{header}'" for header in SAMPLE_HEADERS.get(name, ()))
    url = f"{base_url}{route_prefix}{SAMPLE_PATHS.get(name, '')}"
    return f"curl -s -X POST{headers} {url} -d '{SAMPLE_BODIES[name]}'"


def main(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run every app in ``APPS`` over HTTP until Ctrl-C, then shut shoal down."""
    serve.start(http_options={"host": host, "port": port})
    try:
        # The apps deploy side by side; run_many returns once every replica is ready
        # and HTTP answers, so every URL printed below already works.
        serve.run_many([serve.RunTarget(app, name, prefix) for name, prefix, app in APPS])
        base_url = f"http://{host}:{port}"
        for name, route_prefix, _ in APPS:
            print(f"{name:<9} {base_url}{route_prefix}")
            print(f"          {curl_command(base_url, name, route_prefix)}")
        print("Serving. Press Ctrl-C to stop.", flush=True)
        # Python's own Ctrl-C handler. A shell without job control starts a background
        # command with SIGINT ignored, and Python then installs no handler of its own:
        # CI's test of this demo sent SIGINT and it kept serving. The demo promises Ctrl-C.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        if previous not in (signal.default_int_handler, signal.SIG_IGN):
            logging.getLogger("examples.demo").warning("SIGINT's handler was %r", previous)
        # Until Ctrl-C raises KeyboardInterrupt here, in the main thread. Short sleeps,
        # not one endless wait: the kernel may hand SIGINT to another thread, and only
        # a main thread that wakes up runs Python's handler.
        while True:
            time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve the shoal examples over HTTP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    main(args.host, args.port)
