"""Applications the Ray-shaped config fixture (configs/ray_serve_config.yaml) deploys.

The shape of Ray's documentation examples (text_ml's Translator and Summarizer,
and a builder function with typed arguments), without the models.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from shoal import serve
from shoal.serve.handle import DeploymentHandle


@serve.deployment(ray_actor_options={"num_cpus": 1, "num_gpus": 0.5})
class Translator:
    def __init__(self) -> None:
        self.language = "english"

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.language = config.get("language", "english")

    def translate(self, text: str) -> str:
        return f"[{self.language}] {text}"


@serve.deployment(max_ongoing_requests=7)
class Summarizer:
    def __init__(self, translator: DeploymentHandle) -> None:
        self.translator = translator

    async def __call__(self, text: str) -> str:
        return await self.translator.translate.remote(text.split(".")[0])


app = Summarizer.bind(Translator.bind())


class GreeterArgs(BaseModel):
    greeting: str
    times: int = 1


@serve.deployment
class Greeter:
    def __init__(self, greeting: str, times: int) -> None:
        self.message = " ".join([greeting] * times)

    def __call__(self, name: str) -> str:
        return f"{self.message}, {name}!"


def build_greeter(args: GreeterArgs) -> Any:
    return Greeter.bind(args.greeting, args.times)


def build_from_dict(args: dict[str, str]) -> Any:
    return Greeter.bind(args["greeting"], int(args.get("times", "1")))
