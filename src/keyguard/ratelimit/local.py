"""The in-process counter behind ``memory://`` (and behind the fallback while a shared
counter storage fails): ``limits``' moving window, exact, at a dict lookup per request.

Each key has, per limit, a deque of the monotonic times of its admitted requests
still inside the window, oldest first (at most ``limit`` of them). A request first
drops the entries that have left the window — each entry is dropped once, so this
is O(1) amortized — and is admitted only if every limit's deque has fewer than
``limit`` entries; then, and only then, its time is appended to each. An entry
admitted at ``t`` counts while ``now < t + period``, so in every half-open window
``[a, a + period)`` at most ``limit`` requests are admitted; a refused request
changes nothing but the dropping of entries already gone. The periods and amounts
are ``limits``' own (its ``RateLimitItem``), and the semantics its moving window's.

Why not ``limits``' ``MemoryStorage``: its async flavour costs ~8 µs of CPU per check
against ~1.7 µs here (an exception-wrapping decorator, a per-key ``asyncio.Lock``,
expiry scheduling, a list insert at the front, O(limit)), and keyguard's use of it
with several limits, through ``asyncio.gather``, ~500 µs for four; the synchronous
one ~7.5 µs, with a thread waking every 10 ms to walk every key. This counter needs
neither lock nor thread: it runs on the event loop's thread only, and no ``await``
splits a check from its hit. See
docs/rate-limits.md ("Why memory:// does not go through limits' MemoryStorage").

Memory stays bounded: a key holds at most ``limit`` entries per limit, and a key
whose entries have all expired is forgotten by a sweep that runs every
``SWEEP_INTERVAL`` seconds, a slice of ``SWEEP_SLICE`` keys per request, so no
request pays for a large sweep at once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from keyguard.models import RateLimit
from keyguard.ratelimit.items import limits_item
from keyguard.ratelimit.verdict import Verdict, VerdictTuple

__all__ = ["SWEEP_INTERVAL", "SWEEP_SLICE", "LocalCounter"]

SWEEP_INTERVAL = 10.0  # seconds between two sweeps for keys whose entries have all expired
SWEEP_SLICE = 256  # keys looked at per request while a sweep runs

_new = tuple.__new__  # makes a Verdict from a tuple without NamedTuple.__new__'s call


class _Key:
    """One key's windows, for the limits tuple they were made for."""

    __slots__ = ("limits", "single", "windows")

    def __init__(
        self, limits: Sequence[RateLimit], windows: list[tuple[deque[float], int, float]]
    ) -> None:
        self.limits = limits
        self.windows = windows  # (admitted times, limit, period) per limit
        self.single = windows[0] if len(windows) == 1 else None  # the common case

    def until(self) -> float:
        """When every entry has left its window (for the sweep; not kept per request)."""
        return max(
            (times[-1] + period for times, _, period in self.windows if times),
            default=-math.inf,
        )


class LocalCounter:
    """Exact moving-window counts per ``(api, client_id)``, in this process.

    ``item`` maps a :class:`~keyguard.models.RateLimit` to ``limits``' ``RateLimitItem``
    (its ``amount`` and ``get_expiry()`` are the model; default
    :func:`~keyguard.ratelimit.items.limits_item`); ``clock`` is a monotonic clock in
    seconds (injectable for tests). Not thread-safe: call it from one thread, the
    event loop's, as :class:`~keyguard.ratelimit.RateLimiter` does.
    """

    def __init__(
        self,
        item: Callable[[RateLimit], Any] = limits_item,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._item = item
        self._clock = clock
        self._apis: dict[str, dict[str, _Key]] = {}  # api -> client id -> its windows
        self._next_sweep = clock() + SWEEP_INTERVAL
        self._sweeping: list[tuple[str, str]] | None = None  # (api, client id) to look at
        self._swept = 0

    def __len__(self) -> int:
        """How many keys are remembered (those with entries possibly alive)."""
        return sum(map(len, self._apis.values()))

    def entries(self) -> int:
        """How many admitted-request entries are held, over every key and limit."""
        return sum(
            len(times)
            for keys in self._apis.values()
            for key in keys.values()
            for times, _, _ in key.windows
        )

    def hit(self, api: str, client_id: str, limits: Sequence[RateLimit]) -> Verdict:
        """Count one request against ``limits`` (non-empty), or refuse it counting nothing.

        The verdict names the tightest limit and the requests it has left after this
        one; a refusal, the whole seconds (≥ 1) until a request would pass."""
        return _new(Verdict, self.count(api, client_id, limits))

    def count(self, api: str, client_id: str, limits: Sequence[RateLimit]) -> VerdictTuple:
        """:meth:`hit`'s verdict as a plain tuple ``(admitted, limit, remaining,
        retry_after)``, for the request path (making a ``Verdict`` costs more than a
        tuple)."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        keys = self._apis.get(api)
        if keys is None:
            keys = self._apis[api] = {}
        key = keys.get(client_id)
        if key is None or (key.limits is not limits and key.limits != limits):
            key = keys[client_id] = self._rebuilt(key, limits)
        single = key.single
        if single is not None:  # the common case, without a loop
            times, limit, period = single
            floor = now - period
            while times and times[0] <= floor:
                times.popleft()
            count = len(times)
            if count >= limit:
                return False, limit, 0, _wait(times[0], now, period)
            times.append(now)
            return True, limit, limit - count - 1, 0
        wait, tightest, left = _standing(key.windows, now)
        if wait:
            return False, tightest, 0, wait
        for times, _, _ in key.windows:
            times.append(now)
        return True, tightest, left - 1, 0

    def peek(self, api: str, client_id: str, limits: Sequence[RateLimit]) -> VerdictTuple | None:
        """What :meth:`count` would answer, counting nothing; ``None`` for a key this
        counter holds no entry of (it never counted it, or forgot it)."""
        key = self._apis.get(api, {}).get(client_id)
        if key is None:
            return None
        if key.limits is not limits and key.limits != limits:
            key = self._apis[api][client_id] = self._rebuilt(key, limits)
        wait, tightest, left = _standing(key.windows, self._clock())
        if wait:
            return False, tightest, 0, wait
        return True, tightest, left - 1, 0

    def _rebuilt(self, old: _Key | None, limits: Sequence[RateLimit]) -> _Key:
        """The windows for ``limits``, keeping the entries of any limit the key had before
        (a limit that changed starts empty, as a new ``limits`` key would)."""
        kept: dict[tuple[int, float], deque[float]] = {}
        if old is not None:
            kept = {(limit, period): times for times, limit, period in old.windows}
        windows = []
        for limit in limits:
            item = self._item(limit)
            amount, period = int(item.amount), float(item.get_expiry())
            times = kept.pop((amount, period), None)
            windows.append((deque() if times is None else times, amount, period))
        windows.sort(key=lambda window: window[2])  # shortest period first (ties)
        return _Key(limits, windows)

    def _sweep(self, now: float) -> None:
        """Forget, a slice per call, the keys whose every entry has left its window."""
        pending = self._sweeping
        if pending is None:
            pending = self._sweeping = [
                (api, client_id) for api, keys in self._apis.items() for client_id in keys
            ]
            self._swept = 0
        start = self._swept
        stop = self._swept = start + SWEEP_SLICE
        apis = self._apis
        for api, client_id in pending[start:stop]:
            keys = apis.get(api)
            key = None if keys is None else keys.get(client_id)
            if keys is not None and key is not None and key.until() <= now:
                del keys[client_id]
                if not keys:
                    del apis[api]
        if stop >= len(pending):
            self._sweeping = None
            self._next_sweep = now + SWEEP_INTERVAL


def _standing(windows: list[tuple[deque[float], int, float]], now: float) -> tuple[int, int, int]:
    """The windows at ``now``, their expired entries dropped: the longest wait (seconds,
    0 if every limit has a place: each full one must have one again), the tightest limit
    and the places it has left before this request. The tightest has the fewest left (a
    full one 0); the windows are sorted by period, so the first of a tie is the shortest."""
    wait = 0
    tightest, left = 0, -1
    for times, limit, period in windows:
        floor = now - period
        while times and times[0] <= floor:
            times.popleft()
        if len(times) >= limit:
            wait = max(wait, _wait(times[0], now, period))
        if left < 0 or limit - len(times) < left:
            tightest, left = limit, limit - len(times)
    return wait, tightest, left


def _wait(oldest: float, now: float, period: float) -> int:
    """Whole seconds (≥ 1) from ``now`` until the entry ``oldest`` leaves its window, as
    this counter's own test (``oldest <= now - period``) will see it: the ceiling of the
    exact wait, corrected where float rounding would put it a second off."""
    wait = max(1, math.ceil(oldest + period - now))
    if oldest > (now + wait) - period:
        wait += 1
    elif wait > 1 and oldest <= (now + wait - 1) - period:
        wait -= 1
    return wait
