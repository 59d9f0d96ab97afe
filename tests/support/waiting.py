"""Polling for a condition that something else makes true: the one `wait_for` the tests share."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")


async def wait_for(
    condition: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    message: str = "the condition",
) -> T:
    """Call `condition` (sync or async) until it returns something truthy, and return that.

    Fails with TimeoutError naming `message` (what was awaited) after `timeout` seconds; an async condition
    still pending then is cancelled, so a hung call cannot outlast the timeout.
    """
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            while True:
                outcome = condition()
                result = await outcome if inspect.isawaitable(outcome) else outcome
                if result:
                    return cast(T, result)
                await asyncio.sleep(interval)
    except TimeoutError:
        if scope.expired():  # our deadline, not a TimeoutError raised by the condition itself
            raise TimeoutError(f"timed out after {timeout} s waiting for {message}") from None
        raise
