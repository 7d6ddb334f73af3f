"""An asyncio server on its own event loop in a daemon thread, for sync callers:
the demo, benchmarks and tests run real gRPC servers this way without a subprocess."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class BackgroundServer:
    """Starts `make()`'s server (an object with async start() -> port and async stop())."""

    def __init__(self, make: Callable[[], Any], name: str = "server-loop", timeout: float = 120.0) -> None:
        self._thread = LoopThread(name)

        async def build_and_start() -> Any:  # on the server's own loop: gRPC aio objects bind to it
            server = make()
            return server, await server.start()
        try:
            self.server, self.port = self._thread.run(build_and_start(), timeout)
        except BaseException:
            self._thread.close()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        """Runs a coroutine on the server's loop (e.g. a clean-up the test wants now)."""
        return self._thread.run(coro, timeout)

    def stop(self, *args: Any) -> None:
        """Stops the server (args go to its stop(), e.g. a grace period), then the loop."""
        if self._thread.loop.is_closed():
            return
        try:
            self._thread.run(self.server.stop(*args), timeout=90)
        finally:
            self._thread.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
