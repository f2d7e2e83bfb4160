"""One asyncio helper both emulated vLLM processes need: wait for the first of several things.

Kept apart so the engine-core child can use it without importing the API server's modules.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


async def first(**awaitables: Awaitable[Any]) -> tuple[str, Any]:
    """The name and result of whichever awaitable finishes first; the others are cancelled."""
    order: list[str] = []
    async with asyncio.TaskGroup() as tg:
        tasks = {name: tg.create_task(_as_coro(aw)) for name, aw in awaitables.items()}

        def finished(name: str) -> Callable[[asyncio.Task[Any]], None]:
            def callback(_: asyncio.Task[Any]) -> None:
                order.append(name)
                for other in tasks.values():
                    other.cancel()

            return callback

        for name, task in tasks.items():
            task.add_done_callback(finished(name))
    winner = order[0]
    return winner, tasks[winner].result()


async def _as_coro(aw: Awaitable[Any]) -> Any:  # noqa: ANN401 - passes any result through
    return await aw
