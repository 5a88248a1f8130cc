"""Serve all three examples side by side, each under its own route prefix.

Importing this module has no side effects: it only collects the examples'
bound applications in ``APPS``. ``main()`` starts serving::

    python -m examples.demo            # 127.0.0.1:8000, Ctrl-C to stop
    python -m examples.demo --port 8080
"""

from __future__ import annotations

import argparse
import threading

from examples import composed, ensemble, pipeline
from shoal import serve
from shoal.serve import Application

#: (application name, route prefix, application) for every example.
APPS: list[tuple[str, str, Application]] = [
    ("composed", "/composed", composed.app),
    ("pipeline", "/pipeline", pipeline.app),
    ("ensemble", "/ensemble", ensemble.app),
]

#: A request body that each example understands, used in the printed curl lines.
SAMPLE_BODIES: dict[str, str] = {
    "composed": "Hey!",
    "pipeline": '{"text": "I love it, great and fast!"}',
    "ensemble": '{"x": 2}',
}


def curl_command(base_url: str, name: str, route_prefix: str) -> str:
    """A copy-pasteable curl line that queries one example app."""
    return f"curl -s -X POST {base_url}{route_prefix} -d '{SAMPLE_BODIES[name]}'"


def main(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run every app in ``APPS`` over HTTP until Ctrl-C, then shut shoal down."""
    serve.start(http_options={"host": host, "port": port})
    try:
        for name, route_prefix, app in APPS:
            # Each serve.run returns once that app's replicas are ready and
            # HTTP answers, so every URL printed below already works.
            serve.run(app, name=name, route_prefix=route_prefix)
        base_url = f"http://{host}:{port}"
        for name, route_prefix, _ in APPS:
            print(f"{name:<9} {base_url}{route_prefix}")
            print(f"          {curl_command(base_url, name, route_prefix)}")
        print("Serving. Press Ctrl-C to stop.", flush=True)
        # Event.wait() without a timeout sleeps until Ctrl-C raises
        # KeyboardInterrupt here, in the main thread.
        threading.Event().wait()
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
