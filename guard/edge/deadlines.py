"""Deadlines for request bodies: a client that sends its body too slowly is cut off.

Every body the gateway reads (buffered by ``guard.edge.bodies``, streamed to MLflow by
``guard.upstream.proxy``, read by the policy API) is read through ``timed_receive``:

- no piece of it may take longer than ``idle`` seconds to arrive;
- it must keep up ``min_rate`` bytes per second, with ``idle`` seconds of slack: each byte
  received earns ``1/min_rate`` seconds of waiting (the rule of Apache's mod_reqtimeout
  ``MinRate``), and at most ``idle`` seconds are banked, so neither a trickle of a byte now and
  then nor a fast start followed by a trickle can hold a connection for ever;
- a buffered body (at most ``gateway.max_body_size``) must arrive whole within ``total``.

Only time spent waiting for the client counts: while the gateway is busy (MLflow slow to take a
streamed upload), the clock stands still, so a slow upstream never makes a client too slow.

Past a deadline ``BodyTimeout`` is raised and the refusal left in ``scope[TIMED_OUT]``, for the
layer that answers: ``408 body_timeout`` (with ``Connection: close``, see ``guard.errors``) if
nothing was answered yet. A streamed upload's request to MLflow then fails without its end, so
MLflow never takes a truncated body for a whole one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

from starlette.types import Message, Receive, Scope

from guard.errors import Refusal

TIMED_OUT: Final = "guard.body_timed_out"


@dataclass(frozen=True, slots=True)
class BodyDeadlines:
    """How slowly a request body may arrive (the settings ``gateway.body_*``)."""

    total: float = 300.0  # a buffered body, whole
    idle: float = 60.0  # between two pieces; also how far behind min_rate a body may fall
    min_rate: int = 1024  # bytes per second; 0: no minimum


class BodyTimeout(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def _why(which: str, deadlines: BodyDeadlines) -> str:
    """The detail of a ``body_timeout`` refusal: which deadline passed (written only then)."""
    if which == "total":
        return f"(limit {deadlines.total:g} s for a body)"
    if which == "idle":
        return f"(nothing arrived for {deadlines.idle:g} s)"
    return f"(slower than {deadlines.min_rate} bytes/s)"


def timed_receive(
    scope: Scope, receive: Receive, deadlines: BodyDeadlines, *, whole: bool, pending: bool = True
) -> Receive:
    """``receive``, raising ``BodyTimeout`` when the body arrives too slowly (``whole``: the
    total deadline applies too). Once the body is complete (or if none is ``pending``), messages
    pass through untimed: a later ``receive`` only waits for the client to hang up."""
    credit = deadlines.idle  # seconds the client may still keep the gateway waiting
    waited = 0.0
    done = not pending

    async def timed() -> Message:
        nonlocal credit, waited, done
        if done:
            return await receive()
        limit, which = credit, "rate"
        if credit >= deadlines.idle:
            which = "idle"
        if whole and deadlines.total - waited < limit:
            limit, which = deadlines.total - waited, "total"
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                message = await receive()
        except TimeoutError:
            refusal = Refusal("body_timeout", _why(which, deadlines))
            scope[TIMED_OUT] = refusal
            raise BodyTimeout(refusal) from None
        finally:
            elapsed = time.monotonic() - started
            waited += elapsed
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            if deadlines.min_rate:
                credit = min(credit - elapsed + size / deadlines.min_rate, deadlines.idle)
            else:
                credit = deadlines.idle
            done = not message.get("more_body", False)
        return message

    return timed
