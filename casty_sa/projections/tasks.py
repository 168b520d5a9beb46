"""The asyncio side of a projection: transactions that finish before a cancellation
passes, and the ends of a projection's tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

__all__ = ["all_of", "cancelled", "end_workers", "settled"]


class _Idle(Protocol):
    idle: bool


async def settled[T](step: Coroutine[Any, Any, T]) -> T:
    """Run ``step`` (a transaction) to its end even if the caller is cancelled meanwhile,
    then pass the cancellation on: a transaction cut off half-way by a cancellation can
    leave its connection mid-rollback (SQLite: the file's write lock held until the
    connection is collected)."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation wins
        raise asyncio.CancelledError
    return task.result()


async def end_workers(workers: list[tuple[_Idle, asyncio.Task[int]]]) -> None:
    """Stop every worker: idle ones at once, busy ones after their batch (all at once,
    rolling back, when the caller, run(), was cancelled)."""
    current = asyncio.current_task()
    cancelled = current is not None and current.cancelling() > 0
    for worker, task in workers:
        if worker.idle or cancelled:
            task.cancel()
    tasks = [task for _, task in workers]
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def cancelled(task: asyncio.Future[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def all_of(steps: Any) -> list[int]:
    """Run ``steps`` at once; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]
