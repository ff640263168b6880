"""Retrying transient storage errors: which errors are transient, and a bounded backoff loop.

A dropped connection, a timeout or a 5xx from object storage usually succeeds when tried again a
moment later; a missing file, a permission error or a corrupt tar never does. Only the first kind
is retried, a bounded number of times with exponential backoff, so a flaky store costs seconds
and a broken one fails (or is skipped) promptly instead of hanging. No Ray, no MLflow here.
"""

from __future__ import annotations

import errno
import http.client
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_SLEEP_S = 30.0  # one backoff step never waits longer than this

# OSError errnos a network filesystem or socket gives for a dropped or stalled connection.
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.ENETDOWN,
}
# HTTP statuses object stores answer when they are overloaded or restarting.
TRANSIENT_HTTP_STATUS = {408, 429, 500, 502, 503, 504}
# Client libraries we do not import here (botocore, aiohttp, fsspec): matched by class name so
# this module needs none of them. Each of these names a connection problem, never bad data.
_TRANSIENT_CLASS_NAMES = {
    "EndpointConnectionError",  # botocore
    "ConnectionClosedError",  # botocore
    "ReadTimeoutError",  # botocore / urllib3
    "ConnectTimeoutError",  # botocore / urllib3
    "ResponseStreamingError",  # botocore
    "ProtocolError",  # urllib3
    "ClientPayloadError",  # aiohttp (a body cut short)
    "ServerDisconnectedError",  # aiohttp
    "ClientConnectionError",  # aiohttp
    "FSTimeoutError",  # fsspec
}

# pyarrow's filesystems raise plain OSErrors; these message fragments mark the transient ones
# (the AWS ones are those Ray Train itself retries checkpoint uploads on).
_TRANSIENT_MESSAGE_TOKENS = (
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SLOW_DOWN",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error INTERNAL_FAILURE",
    "Connection reset",
    "Connection timed out",
    "Broken pipe",
)


class TransientHTTPError(ConnectionError):
    """An HTTP status that says 'try again' (503, 429, ...)."""


class RetriesExhaustedError(OSError):
    """A transient error persisted through every retry; the message names what and where."""


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` further attempts after the first failure, sleeping backoff_s, 2x, 4x, ...
    (each step capped at MAX_SLEEP_S) in between: at most `retries` sleeps in all."""

    retries: int = 3
    backoff_s: float = 0.5

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return min(MAX_SLEEP_S, self.backoff_s * 2 ** (attempt - 1))

    def max_total_sleep_s(self) -> float:
        return sum(self.delay(i) for i in range(1, self.retries + 1))


NO_RETRY = RetryPolicy(retries=0, backoff_s=0.0)


def is_transient(err: BaseException) -> bool:
    """True for errors that a retry may cure (connection dropped, timeout, 5xx); False for
    missing files, permissions, corrupt data and everything not known to be transient."""
    if isinstance(err, (RetriesExhaustedError, FileNotFoundError, PermissionError)):
        return False
    if isinstance(err, (IsADirectoryError, NotADirectoryError)):
        return False
    # IncompleteRead / BadStatusLine: a body or a status line cut off by a dropped connection.
    if isinstance(
        err, (ConnectionError, TimeoutError, http.client.IncompleteRead, http.client.BadStatusLine)
    ):
        return True
    if any(c.__name__ in _TRANSIENT_CLASS_NAMES for c in type(err).__mro__):
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    if isinstance(err, OSError) and any(t in str(err) for t in _TRANSIENT_MESSAGE_TOKENS):
        return True
    cause = err.__cause__ or err.__context__
    return cause is not None and cause is not err and is_transient(cause)


class Retrier:
    """Runs operations under one shared retry budget: `policy.retries` transient failures in
    all, however many calls they are spread over (a stream read in many pieces gets the same
    bounded number of retries as one call). Past the budget, RetriesExhaustedError names
    `what`; a non-transient error is re-raised at once."""

    def __init__(
        self, policy: RetryPolicy, what: str, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.policy, self.what, self.sleep = policy, what, sleep
        self.failures = 0

    def call(self, fn: Callable[[], T], on_failure: Callable[[], None] | None = None) -> T:
        """fn(), retried; on_failure() runs after every failed try (e.g. close a broken
        connection) before the error is judged."""
        while True:
            try:
                return fn()
            except Exception as err:
                if on_failure is not None:
                    on_failure()
                if not is_transient(err):
                    raise
                self.failures += 1
                if self.failures > self.policy.retries:
                    raise RetriesExhaustedError(
                        f"{self.what}: gave up after {self.policy.retries} retries "
                        f"({type(err).__name__}: {err})"
                    ) from err
                wait = self.policy.delay(self.failures)
                log.warning(
                    "%s: transient error (%s: %s); retry %d of %d in %.2fs",
                    self.what, type(err).__name__, err, self.failures, self.policy.retries, wait,
                )  # fmt: skip
                self.sleep(wait)


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """fn(), retried on transient errors per `policy` (see Retrier)."""
    return Retrier(policy, what, sleep).call(fn)
