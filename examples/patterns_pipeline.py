"""Pipeline pattern: the seed article's computer-vision pipeline, with a block as one stage.

"The raw image goes through common preprocessing [...]. A detection classifier
model is used to identify [...] the category. It's a cat. The image is passed
into a keypoint detection model to identify the posture [...]. Lastly, an NLP
synthesis model generates a category of what the picture shows. In this
case, a standing cat."

A pipeline needs no building block: the ``Pipeline`` ingress calls each stage
through its handle. The detection stage here is itself an ``Ensemble`` of
three detectors voting: blocks stand wherever a model stands. Keypoints run at
the same time as detection, and both responses are handed to the captioner
without waiting for them in the ingress.

Run it (serves on 127.0.0.1:8000, captions a few "images", shuts down)::

    python -m examples.patterns_pipeline
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from shoal import serve
from shoal.patterns import Ensemble, vote
from shoal.serve import DeploymentHandle


@serve.deployment
class Preprocess:
    """Decode and clean the input (here: a text description stands in for the pixels)."""

    def __call__(self, image: dict[str, Any]) -> list[str]:
        return image["description"].lower().replace(",", " ").split()


@serve.deployment
class Detector:
    """A toy detector: the category whose cue words it sees most."""

    def __init__(self, cues: dict[str, list[str]]) -> None:
        self.cues = cues

    def __call__(self, words: list[str]) -> str:
        hits = {label: sum(word in cue for word in words) for label, cue in self.cues.items()}
        return max(hits, key=hits.__getitem__)


@serve.deployment
class Keypoints:
    """A toy keypoint model: the posture, from where the paws are."""

    def __call__(self, words: list[str]) -> str:
        return "standing" if "paws" in words and "down" in words else "lying"


@serve.deployment
class Captioner:
    """A toy NLP synthesis model."""

    def __call__(self, category: str, posture: str) -> str:
        return f"a {posture} {category}"


@serve.deployment
class Pipeline:
    """Ingress: preprocess, then detection and keypoints at once, then the caption."""

    def __init__(self, *stages: DeploymentHandle) -> None:
        self.preprocess, self.detect, self.keypoints, self.caption = stages

    async def __call__(self, request: Request) -> dict[str, str]:
        return await self.describe(await request.json())

    async def describe(self, image: dict[str, Any]) -> dict[str, str]:
        words = await self.preprocess.remote(image)
        category = self.detect.remote(words)  # not awaited: runs while keypoints run
        posture = self.keypoints.remote(words)
        # Responses passed as arguments are resolved by shoal before the call is sent.
        return {"caption": await self.caption.remote(category, posture)}


detection = Ensemble.bind(
    [
        Detector.options(name="ears").bind({"cat": ["pointy"], "dog": ["floppy"]}),
        Detector.options(name="face").bind({"cat": ["whiskers"], "dog": ["snout"]}),
        Detector.options(name="coat").bind({"cat": ["tabby"], "dog": ["shaggy"]}),
    ],
    vote,
)
app = Pipeline.bind(Preprocess.bind(), detection, Keypoints.bind(), Captioner.bind())


if __name__ == "__main__":
    import json
    import urllib.request

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        serve.run(app, name="patterns-pipeline", route_prefix="/")
        for description in [
            "pointy ears, whiskers, four paws down",
            "floppy ears, a wet snout, curled up",
            "a tabby coat, a long snout, pointy ears, paws down",
        ]:
            request = urllib.request.Request(
                "http://127.0.0.1:8000/", data=json.dumps({"description": description}).encode()
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                print(f"{description!r} -> {json.loads(response.read())['caption']}")
    finally:
        serve.shutdown()
