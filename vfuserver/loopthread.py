"""Calls that must run on the event loop's thread, made from any thread.

Trio's objects (events, parking lots, cancel scopes) belong to the thread that runs
``trio.run``; a device's serving thread hands such calls over with
``TrioToken.run_sync_soon``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import trio


class LoopThread:
    """The event loop's thread, once :meth:`capture` has run on it."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._ident: int | None = None

    def capture(self) -> None:
        """Remember the calling thread (it must run trio) as the event loop's."""
        self._token = trio.lowlevel.current_trio_token()
        self._ident = threading.get_ident()

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` now on the event loop's thread (or before any was captured, when no
        other thread can be calling yet); hand it to the loop from any other thread."""
        if self._token is None or threading.get_ident() == self._ident:
            fn()
        else:
            self._token.run_sync_soon(fn)
