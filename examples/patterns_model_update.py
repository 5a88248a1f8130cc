"""Model update pattern: validate a new model version on live traffic, then roll it out.

The seed article: "you still select the output from the known good model, but
you are also collecting live output from the newer version of the models in
order to validate it". Two steps, each a building block:

1. ``shadow_app``: every answer comes from ``v1``; each request is also
   mirrored to ``v2`` in the background, and the two are compared (agreement
   rate, latencies, ``v2``'s errors): users never wait for ``v2``.
2. ``app``: a canary. ``v2`` answers 10% of the requests, a share raised
   live (a new ``user_config``: no replica restarts). When ``v2`` starts
   failing (here on inputs it never saw in the shadow phase) more often than
   ``max_error_rate`` (an exception, or an answer ``check`` rejects), the
   canary rolls it back by itself.

Run it (serves on 127.0.0.1:8000, walks through both steps, shuts down)::

    python -m examples.patterns_model_update
"""

from __future__ import annotations

import asyncio
from typing import Any

from shoal import serve
from shoal.patterns import Canary, Shadow
from shoal.serve import Application


@serve.deployment
class AnimalClassifierV1:
    """The known-good model: slow and simple."""

    async def __call__(self, image: dict[str, Any]) -> str:
        await asyncio.sleep(0.02)
        return "cat" if "meow" in image["description"] else "dog"


@serve.deployment
class AnimalClassifierV2:
    """The new version: faster, also knows foxes, and has a bug with some inputs."""

    async def __call__(self, image: dict[str, Any]) -> str:
        await asyncio.sleep(0.005)
        description = image["description"]
        if "🦄" in description:
            return "🦄"  # the bug the canary will catch: a label that does not exist
        if "yip" in description:
            return "fox"
        return "cat" if "meow" in description else "dog"


def valid_label(label: str) -> bool:
    """The canary's check of each v2 answer: False counts as a failure, like an exception."""
    return label in {"cat", "dog", "fox"}


def same_label(v1_label: str, v2_label: str) -> bool:
    """How the shadow compares the two versions (a number would be averaged instead)."""
    return v1_label == v2_label


shadow_app = Shadow.bind(AnimalClassifierV1.bind(), AnimalClassifierV2.bind(), compare=same_label)


def canary(weight: float) -> Application:
    """The canary app, ``v2`` getting ``weight`` of the traffic (applied by ``reconfigure``)."""
    return Canary.options(user_config={"weight": weight}).bind(
        AnimalClassifierV1.bind(),
        AnimalClassifierV2.bind(),
        check=valid_label,
        max_error_rate=0.1,  # roll back when more than 10% of v2's requests fail...
        window_s=60.0,  # ...over the last minute...
        min_requests=10,  # ...once v2 had at least 10 requests in it
    )


app = canary(0.1)

TRAFFIC = ["meow meow", "woof", "a quiet meow", "woof woof", "yip yip", "meow?", "grr woof"]


if __name__ == "__main__":
    import json
    import urllib.request
    from collections import Counter

    def post(description: str) -> str:
        """POST an image description; returns "<version>: <label>"."""
        body = json.dumps({"description": description}).encode()
        request = urllib.request.Request("http://127.0.0.1:8000/", data=body)
        with urllib.request.urlopen(request, timeout=10) as response:
            member = json.loads(response.headers["x-shoal-metadata"])["member"]
            return f"{member[-2:]}: {response.read().decode()}"  # e.g. "V2: fox"

    def show(stats: dict[str, Any], *keys: str) -> None:
        print("   ", {key: stats[key] for key in keys})

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        print("1. shadow: v1 answers, v2 is mirrored and compared")
        handle = serve.run(shadow_app, name="update", route_prefix="/")
        print("   answered by", Counter(post(text) for text in TRAFFIC * 10))
        stats = handle.wait_for_mirrors.remote().result(timeout_s=30)
        show(stats, "mirrored", "dropped", "agreement_rate", "candidate_errors")
        print("    p50 ms:", {k: v["p50"] for k, v in stats["latency_ms"].items()})

        print("2. canary at 10%, then raised to 50% live")
        handle = serve.run(app, name="update", route_prefix="/")
        print("   answered by", Counter(post(text) for text in TRAFFIC * 10))
        replica = handle.stats.remote().result(timeout_s=10)["replica"]
        handle = serve.run(canary(0.5), name="update", route_prefix="/")  # a new user_config
        print("   answered by", Counter(post(text) for text in TRAFFIC * 10))
        stats = handle.stats.remote().result(timeout_s=10)
        print("    same canary replica:", stats["replica"] == replica, "weight:", stats["weight"])

        print("3. new inputs make v2 fail: the canary rolls it back by itself")
        print("   answered by", Counter(post(text + " 🦄") for text in TRAFFIC * 10))
        stats = handle.stats.remote().result(timeout_s=10)
        show(stats, "weight", "effective_weight", "rolled_back", "rollback_reason")
        print("   answered by", Counter(post(text + " 🦄") for text in TRAFFIC * 10))
    finally:
        serve.shutdown()
