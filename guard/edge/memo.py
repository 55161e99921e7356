"""A bounded memo for what the edge works out per request from a few recurring values (header
names, Host headers): ``memo[key]`` is ``compute(key)``, remembered."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(dict[K, V]):
    """``memo[key]`` is ``compute(key)``, remembered for up to ``size`` keys that ``keep``
    accepts (a bound on each key's length: such keys come from callers). When full it starts
    over, so keys a caller invents cannot keep the usual ones out for good; ``compute`` must be
    pure."""

    def __init__(
        self, compute: Callable[[K], V], size: int, keep: Callable[[K], bool] | None = None
    ) -> None:
        super().__init__()
        self.compute = compute
        self.size = size
        self.keep = keep

    def __missing__(self, key: K) -> V:
        value = self.compute(key)
        if self.keep is None or self.keep(key):
            if len(self) >= self.size:
                self.clear()
            self[key] = value
        return value
