"""Which event loop the calling code runs on: the one check every layer shares."""

from __future__ import annotations

import asyncio
from asyncio import events


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the calling code runs on ``loop`` (False outside any event loop).

    Cheap enough for the request path: it reads the running loop without raising
    (``asyncio.get_running_loop()`` raises when there is none).
    """
    return events._get_running_loop() is loop
