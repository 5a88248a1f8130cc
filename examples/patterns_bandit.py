"""Bandit pattern (online learning): learn which model each user prefers.

The seed article's "dynamically learn parameters to orchestrate models, for
example, learning which model a user prefers". Three recommenders answer
every request equally well as far as shoal knows; users, though, click on
some more than others. ``BanditRouter`` picks a recommender per request with
Thompson sampling, separately per user (``context_key="user_id"``); the
client reports each click (reward 1) or not (reward 0) afterwards, by the
request's id, to ``POST /feedback``. What was learned lives in one
``BanditState`` replica, shared by both router replicas.

Run it (serves on 127.0.0.1:8000, simulates 1,500 visits, shuts down)::

    python -m examples.patterns_bandit
"""

from __future__ import annotations

from typing import Any

from shoal import serve
from shoal.patterns import BanditRouter, BanditState


@serve.deployment
class Recommender:
    """A toy recommender: its style of picks, for the user."""

    def __init__(self, style: str, items: list[str]) -> None:
        self.style, self.items = style, items

    def __call__(self, visit: dict[str, Any]) -> dict[str, Any]:
        return {"user_id": visit["user_id"], "style": self.style, "items": self.items}


recommenders = {
    "popular": Recommender.bind("popular", ["Dune", "Heat", "Up"]),
    "fresh": Recommender.bind("fresh", ["Past Lives", "Aftersun"]),
    "similar": Recommender.bind("similar", ["Alien", "Aliens", "Alien 3"]),
}

app = BanditRouter.options(num_replicas=2).bind(
    recommenders,
    BanditState.bind("thompson"),  # or BanditState.bind("epsilon_greedy", epsilon=0.1)
    context_key="user_id",  # learn per user; without it, one preference for everyone
)

#: The simulated users: the chance that they click on each recommender's picks.
CLICK_RATES = {
    "ana": {"popular": 0.7, "fresh": 0.2, "similar": 0.1},
    "bo": {"popular": 0.2, "fresh": 0.3, "similar": 0.6},
    "cy": {"popular": 0.3, "fresh": 0.8, "similar": 0.3},
}


if __name__ == "__main__":
    import json
    import random
    import urllib.request
    from collections import Counter

    def post(path: str, body: dict[str, Any]) -> tuple[Any, Any]:
        """POST a JSON body; returns the JSON answer and the response headers."""
        url, data = f"http://127.0.0.1:8000{path}", json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return json.loads(r.read()), r.headers

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        serve.run(app, name="patterns-bandit", route_prefix="/")
        late: dict[str, Counter[str]] = {user: Counter() for user in CLICK_RATES}
        for visit in range(1500):
            user = random.choice(list(CLICK_RATES))
            answer, headers = post("/", {"user_id": user})
            clicked = random.random() < CLICK_RATES[user][answer["style"]]
            # The reward arrives later, from the client, keyed by the request's id.
            post("/feedback", {"request_id": headers["x-request-id"], "reward": float(clicked)})
            if visit >= 1200:
                late[user][answer["style"]] += 1
        for user, rates in CLICK_RATES.items():
            favourite = max(rates, key=rates.__getitem__)
            print(f"{user} prefers {favourite}; in the last 300 visits got {dict(late[user])}")
        with urllib.request.urlopen("http://127.0.0.1:8000/stats", timeout=10) as response:
            stats = json.loads(response.read())  # the shared state, from either router replica
        for user, arms in stats["contexts"].items():
            means = {
                arm: round(arm_stats["mean_reward"] or 0.0, 2) for arm, arm_stats in arms.items()
            }
            print(f"learned click rates for {user}: {means}")
    finally:
        serve.shutdown()
