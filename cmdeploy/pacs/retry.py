"""Retries with exponential back-off for transient PACS failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from cmdeploy.pacs.errors import PacsError

T = TypeVar("T")


def backoff_delays(retries: int, backoff: float) -> list[float]:
    """Seconds to wait before retry 1..``retries``: ``backoff * 2**k``."""
    return [backoff * 2.0**k for k in range(max(0, int(retries)))]


def with_retries(
    operation: Callable[[], T],
    *,
    retries: int,
    backoff: float,
    on_retry: Callable[[PacsError, int, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``operation``; on a transient :class:`PacsError` wait and run it again, at most
    ``retries`` more times. Non-transient errors, and the last transient one, are raised.

    ``on_retry(error, attempt, delay)`` is called before each wait (attempt counts from 1).
    """
    delays = backoff_delays(retries, backoff)
    attempt = 0
    while True:
        try:
            return operation()
        except PacsError as exc:
            if not exc.transient or attempt >= len(delays):
                raise
            delay = delays[attempt]
            attempt += 1
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            sleep(delay)
