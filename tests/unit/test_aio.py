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


def test_in_a_thread_keeps_the_loop_running_and_returns_the_result() -> None:
    import threading
    import time

    from ichat.aio import in_a_thread

    async def main() -> None:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        result = await in_a_thread(
            lambda: (time.sleep(0.3), threading.current_thread().name)[1],
            name="blocking",
            on_abandoned=lambda _: None,
        )
        ticker.cancel()
        assert result == "blocking"
        assert ticks >= 10  # the loop ran while the call blocked its thread

    asyncio.run(main())


def test_in_a_thread_raises_what_the_call_raised() -> None:
    from ichat.aio import in_a_thread

    def fail() -> None:
        raise ValueError("no engine")

    async def main() -> None:
        with pytest.raises(ValueError, match="no engine"):
            await in_a_thread(fail, name="t", on_abandoned=lambda _: None)

    asyncio.run(main())


def test_what_a_cancelled_wait_would_have_got_is_handed_over_not_lost() -> None:
    import threading

    from ichat.aio import in_a_thread

    release = threading.Event()
    abandoned: list[str] = []

    async def main() -> None:
        task = asyncio.create_task(
            in_a_thread(
                lambda: (release.wait(5), "engine")[1], name="t", on_abandoned=abandoned.append
            )
        )
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        for _ in range(200):
            if abandoned:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert abandoned == ["engine"]
