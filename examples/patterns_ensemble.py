"""Ensemble pattern (aggregation): classifiers vote on what the picture shows.

The seed article's example: if two models vote "cat" and one votes "dog", the
answer is "cat". Three toy classifiers look at different cues of an image
description (its ears, its sound, its whiskers); ``Ensemble`` asks all three
at once and combines them with ``vote``. One classifier sometimes takes too
long: with ``timeout_s`` it is left out (and named in the metadata) instead
of slowing every answer down, and ``min_responses=2`` keeps a quorum.

Run it (serves on 127.0.0.1:8000, sends a few requests, shuts down)::

    python -m examples.patterns_ensemble
"""

from __future__ import annotations

import asyncio
from typing import Any

from shoal import serve
from shoal.patterns import Ensemble, vote

#: Classifier name -> {label: words that point to it}, and how long it takes to answer.
CLASSIFIERS: dict[str, tuple[dict[str, list[str]], float]] = {
    "ears": ({"cat": ["pointy"], "dog": ["floppy"]}, 0.01),
    "sound": ({"cat": ["meow", "purr"], "dog": ["bark", "woof"]}, 0.01),
    # A big, slow model: it thinks for 0.3 s on long descriptions.
    "whiskers": ({"cat": ["whiskers"], "dog": ["snout", "tail"]}, 0.3),
}


@serve.deployment
class KeywordClassifier:
    """A toy classifier: the label whose cue words appear most in ``image["description"]``."""

    def __init__(self, cues: dict[str, list[str]], slow_s: float) -> None:
        self.cues, self.slow_s = cues, slow_s

    async def __call__(self, image: dict[str, Any]) -> str:
        text = image["description"].lower()
        # Stands in for inference time: long inputs are slow for the slow model.
        await asyncio.sleep(self.slow_s if len(text) > 40 else 0.01)
        scores = {label: sum(word in text for word in words) for label, words in self.cues.items()}
        return max(scores, key=scores.__getitem__)  # ties: the first label, "cat"


# Members are bound deployments; .options(name=...) names each (names appear in the metadata).
members = [
    KeywordClassifier.options(name=name).bind(cues, slow_s)
    for name, (cues, slow_s) in CLASSIFIERS.items()
]
app = Ensemble.bind(
    members,
    vote,
    timeout_s=0.1,  # a member slower than this is left out of the vote
    min_responses=2,  # fewer than two answers: QuorumError (HTTP 503)
)


if __name__ == "__main__":
    import json
    import urllib.request

    def post(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """POST a JSON body; returns the answer and the x-shoal-metadata header."""
        request = urllib.request.Request("http://127.0.0.1:8000/", data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode(), json.loads(response.headers["x-shoal-metadata"])

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        handle = serve.run(app, name="patterns-ensemble", route_prefix="/")
        for description in [
            "pointy ears, says meow",  # cat, cat, and cat (no cue: its first label)
            "floppy ears, barks: woof",  # dog, dog, cat: two against one, dog
            "pointy ears, long whiskers and a fluffy tail; it purrs all day long",  # one is slow
        ]:
            answer, metadata = post({"description": description})
            print(f"{description!r}\n  -> {answer}  {metadata}")
        # From Python, with_metadata returns an EnsembleResult with every member's output.
        result = handle.with_metadata.remote({"description": "floppy, woof"}).result(timeout_s=10)
        print(result.value, result.outputs, result.failed)
    finally:
        serve.shutdown()
