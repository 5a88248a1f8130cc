"""Dynamic selection pattern: pick the model for each request.

The seed article's example: if the input contains a cat, model A is used,
because it is specialized for cats; if it contains a dog, model B. Here a
``Selector`` routes by the input's ``animal`` field (set, in a real system, by
a cheap detector upstream; see ``examples/patterns_pipeline.py``); anything
else goes to a generalist, unless the client names a model in the
``x-model`` header. ``ab_app`` shows the other kind of selection, an A/B
test: by weight, sticky per user, so one user keeps seeing one model.

Run it (serves on 127.0.0.1:8000, sends a few requests, shuts down)::

    python -m examples.patterns_selection
"""

from __future__ import annotations

from typing import Any

from shoal import serve
from shoal.patterns import Selector


@serve.deployment
class BreedModel:
    """A toy specialist: names a breed from the description's size word."""

    def __init__(self, species: str, breeds: dict[str, str]) -> None:
        self.species, self.breeds = species, breeds

    def __call__(self, image: dict[str, Any]) -> dict[str, str]:
        size = "small" if "small" in image.get("description", "") else "large"
        return {"species": self.species, "breed": self.breeds[size]}


def by_animal(image: dict[str, Any]) -> str | None:
    """The routing rule: a plain function of the input, returning a member's name (or None)."""
    return {"cat": "cat_model", "dog": "dog_model"}.get(image.get("animal", ""))


models = {
    "cat_model": BreedModel.bind("cat", {"small": "Singapura", "large": "Maine Coon"}),
    "dog_model": BreedModel.bind("dog", {"small": "Chihuahua", "large": "Great Dane"}),
    "generalist": BreedModel.bind("animal", {"small": "mouse?", "large": "horse?"}),
}

# First rule that names a member wins: choose(), then the header, then the default.
app = Selector.bind(models, choose=by_animal, header="x-model", default="generalist")

# An A/B test: 80% of users get model "a", 20% model "b"; a user's share is a hash of
# their id (and the salt), so it is the same on every replica and after restarts.
ab_app = Selector.bind(
    {
        "a": BreedModel.options(name="model_a").bind(
            "cat", {"small": "Siamese", "large": "Siamese"}
        ),
        "b": BreedModel.options(name="model_b").bind("cat", {"small": "Sphynx", "large": "Sphynx"}),
    },
    weights={"a": 0.8, "b": 0.2},
    sticky_key="user_id",
    salt="breed-test-1",
)


if __name__ == "__main__":
    import json
    import urllib.request
    from collections import Counter

    def post(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        """POST a JSON body; returns the answer and the member that produced it."""
        request = urllib.request.Request(
            f"http://127.0.0.1:8000{path}", data=json.dumps(body).encode(), headers=headers or {}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            member = json.loads(response.headers["x-shoal-metadata"])["member"]
            return json.loads(response.read()), member

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        serve.run(app, name="patterns-selection", route_prefix="/select")
        serve.run(ab_app, name="patterns-ab", route_prefix="/ab")
        print(post("/select", {"animal": "cat", "description": "a small cat"}))
        print(post("/select", {"animal": "dog", "description": "a huge dog"}))
        print(post("/select", {"animal": "fox", "description": "a small fox"}))
        print(post("/select", {"description": "small"}, {"x-model": "dog_model"}))
        # Each user always sees the same model; about 20% of users see model "b".
        seen = {f"user-{i}": post("/ab", {"user_id": f"user-{i}"})[1] for i in range(200)}
        again = {user: post("/ab", {"user_id": user})[1] for user in seen}
        print("sticky:", seen == again, Counter(seen.values()))
    finally:
        serve.shutdown()
