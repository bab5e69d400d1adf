from __future__ import annotations

import asyncio

import pytest

from ichat.aio import first_completed


def test_the_first_to_end_wins_and_the_others_are_cancelled() -> None:
    async def main() -> None:
        fast, slow = await first_completed(asyncio.sleep(0, "fast"), asyncio.sleep(60))
        assert fast.result() == "fast"
        await asyncio.sleep(0)  # the cancellation is delivered
        assert slow.cancelled()

    asyncio.run(main())


def test_a_timeout_cancels_every_one() -> None:
    async def main() -> None:
        futures = await first_completed(asyncio.sleep(60), asyncio.sleep(60), timeout=0.01)
        await asyncio.sleep(0)
        assert all(f.cancelled() for f in futures)

    asyncio.run(main())


def test_cancelling_the_caller_cancels_every_one() -> None:
    async def main() -> None:
        event = asyncio.Event()
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(asyncio.sleep(60))
        caller = asyncio.ensure_future(first_completed(waiter, sleeper))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)
        assert waiter.cancelled() and sleeper.cancelled()

    asyncio.run(main())
