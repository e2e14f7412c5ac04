"""Generating client ids and secrets, and hashing and checking secrets.

Client ids are 42 lowercase hex characters: 128 random bits from :mod:`secrets`
(32 characters, the shape of the client ids IBM's gateway issues) followed by
a 40-bit *tag*, the first 10 hex characters of HMAC-SHA256 under the store's
tag key of the API name and the random part (:mod:`keyguard.idtags`). The tag
lets the request path refuse a made-up id without a store read; it is derived
from public data and holds nothing secret. Ids made before tags (32 hex
characters, *legacy* ids) keep working. Secrets are 43 URL-safe characters
(256 bits). Only a passlib hash of a secret is ever stored.

The default scheme is ``pbkdf2_sha256`` with a single round: salted, named in
the hash string (so ``needs_update`` can migrate hashes later), and fast.
Key stretching exists to slow down guessing of low-entropy passwords; a
256-bit random secret cannot be guessed however fast the hash is, so extra
rounds would only cost every request. Users whose policy demands a slow
scheme pass their own ``CryptContext``; verification then runs in a worker
thread so the event loop is never blocked, and a verification that cannot
start within its deadline is refused (``VerificationBusy``, a 503 on the
request path) instead of queueing without end. Waiting verifications are
served by their client id's recent failures and verifications under way,
fewest first, so a flood of wrong secrets for one id queues behind the first
requests of other callers instead of in front of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import itertools
import os
import secrets as _secrets
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from passlib.context import CryptContext

from keyguard.errors import StoreUnavailable

__all__ = [
    "CLIENT_ID_LENGTH",
    "CLIENT_ID_TAG_LENGTH",
    "DEFAULT_CONTEXT",
    "LEGACY_CLIENT_ID_LENGTH",
    "SecretHasher",
    "VerificationBusy",
    "client_id_tag",
    "could_be_client_id",
    "new_client_id",
    "new_secret",
]

LEGACY_CLIENT_ID_LENGTH = 32
"""Hex characters of a client id made before tags, and of every id's random part."""
CLIENT_ID_TAG_LENGTH = 10
"""Hex characters of a client id's tag: 40 bits, so a made-up id passes with p = 2**-40."""
CLIENT_ID_LENGTH = LEGACY_CLIENT_ID_LENGTH + CLIENT_ID_TAG_LENGTH
"""Hex characters of a tagged client id (the random part, then the tag)."""
SECRET_BYTES = 32  # 256 bits
_HEX = "0123456789abcdef"
FAILURE_WINDOW = 60.0
"""Seconds a client id's failed verifications count against its place in the queue."""

DEFAULT_CONTEXT = CryptContext(
    schemes=["pbkdf2_sha256"],
    pbkdf2_sha256__default_rounds=1,
)
"""The default context: salted PBKDF2-SHA256, one round (see the module docstring)."""


class VerificationBusy(StoreUnavailable):
    """Every verification slot stayed busy past the deadline: answered like an outage (503)."""

    code = "verification_busy"


def new_client_id(tag_key: bytes | None = None, api: str | None = None) -> str:
    """A fresh client id: 128 random bits as 32 lowercase hex characters, followed by
    the tag of ``api`` and those bits under ``tag_key`` when one is given (42 in all).

    Without ``tag_key``: an untagged id, the shape of ids made before tags.
    """
    random_part = _secrets.token_hex(LEGACY_CLIENT_ID_LENGTH // 2)
    if tag_key is None:
        return random_part
    if api is None:
        raise ValueError("a tagged client id needs the name of its API")
    return random_part + client_id_tag(tag_key, api, random_part)


def client_id_tag(tag_key: bytes, api: str, random_part: str) -> str:
    """The tag of a client id: HMAC-SHA256 under ``tag_key`` of the API name and the id's
    random part, its first ``CLIENT_ID_TAG_LENGTH`` hex characters.

    The API name is length-prefixed, so no two (api, random part) pairs share an input.
    A name no API can have (a lone surrogate: from a caller of ``KeyManager.authenticate``,
    not the middleware, which checks names) gets a tag too, one no id carries, rather
    than a ``UnicodeEncodeError``; every real API name encodes as plain UTF-8.
    """
    api_bytes = api.encode("utf-8", "surrogatepass")
    message = len(api_bytes).to_bytes(4, "big") + api_bytes + random_part.encode()
    return hmac.digest(tag_key, message, "sha256").hex()[:CLIENT_ID_TAG_LENGTH]


def new_secret() -> str:
    """A fresh secret: 256 random bits, URL-safe base64 (43 characters)."""
    return _secrets.token_urlsafe(SECRET_BYTES)


def could_be_client_id(value: str) -> bool:
    """Whether ``value`` has the shape of a client id keyguard issues, tagged (42 hex
    characters) or legacy (32).

    Anything else can be refused without asking the store.
    """
    return len(value) in _ID_LENGTHS and not value.strip(_HEX)


_ID_LENGTHS = frozenset({LEGACY_CLIENT_ID_LENGTH, CLIENT_ID_LENGTH})


class _Slots:
    """Verification slots of one event loop, handed out by priority (lowest first).

    A semaphore whose waiters are a heap of ``(priority, arrival, future)``
    instead of a FIFO: a released slot goes to the waiter with the fewest
    recent failures, the earliest among equals. A waiter past its deadline
    leaves with ``False``; its entry is dropped when it reaches the top or
    when stale entries outnumber live ones, so the heap stays bounded by the
    live waiters.
    """

    __slots__ = ("_arrivals", "_free", "_heap", "_live", "under_way")

    def __init__(self, size: int) -> None:
        self._free = size
        self._heap: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._arrivals = itertools.count()
        self._live = 0
        # client_id -> its verifications waiting or running (entries dropped at zero)
        self.under_way: dict[str, int] = {}

    @property
    def waiting(self) -> int:
        return self._live

    async def acquire(self, priority: int, deadline: float | None) -> bool:
        """Take a slot: ``True`` once taken, ``False`` if none came within ``deadline``."""
        if self._free > 0:  # free slots imply no waiters: taken at once, no timer
            self._free -= 1
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if len(self._heap) > 2 * self._live + 64:
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (priority, next(self._arrivals), future))
        self._live += 1
        timer = None if deadline is None else loop.call_later(deadline, self._expire, future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():  # the task was cancelled while waiting
                self._live -= 1
            elif future.done() and future.result():
                self.release()  # handed a slot just as the task was cancelled
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, future: asyncio.Future[bool]) -> None:
        if not future.done():
            self._live -= 1
            future.set_result(False)

    def release(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        while self._heap:
            future = heapq.heappop(self._heap)[2]
            if not future.done():
                self._live -= 1
                future.set_result(True)
                return
        self._free += 1


class SecretHasher:
    """Hashes new secrets and checks presented ones against stored hashes.

    A secret that verified once is remembered — as its SHA-256 digest, bound
    to the stored hash it matched — so that a client's next request with the
    same secret costs one SHA-256 instead of a passlib verification. (A
    digest of a 256-bit random secret cannot be reversed, and only secrets
    that verified are remembered.) A wrong secret is always verified in full,
    and so is a secret sent to a key that has none, against a dummy hash:
    the two share a refusal message, so neither is cheaper than the other.

    ``offload`` runs passlib in worker threads; it defaults to on for any
    context other than the default one, since only the default is known to
    be fast. At most ``offload_threads`` verifications run at once (default:
    one less than the CPU count, at least one), so a burst of slow
    verifications — say, a flood of wrong secrets — always leaves a core to
    the event loop; the rest wait their turn, but only until the deadline
    ``verify`` is given: past it the verification is refused with
    ``VerificationBusy``. Waiters are not served in arrival order but by
    their client id's failed verifications in the last ``FAILURE_WINDOW``
    seconds (``failed`` counts them) plus its verifications already waiting
    or running, fewest first: a flood of wrong secrets for an id — even its
    first burst, before any has failed — piles up behind every other caller's
    first request, so it costs its sender the refusals while valid callers
    get the slots. The id under attack is the exception: its own first
    requests queue among the flood's (a secret that verified before is
    answered by ``remembered`` and never queues). ``max_remembered`` bounds
    the memory of verified secrets and, separately, of failure counts (client
    ids only, nothing of a secret); the count of verifications under way per
    id lasts only as long as they do.
    """

    def __init__(
        self,
        context: CryptContext | None = None,
        *,
        offload: bool | None = None,
        offload_threads: int | None = None,
        max_remembered: int = 10_000,
    ) -> None:
        self.context = DEFAULT_CONTEXT if context is None else context
        self.offload = (context is not None) if offload is None else offload
        self._threads = offload_threads or max(1, (os.cpu_count() or 2) - 1)
        self._executor: ThreadPoolExecutor | None = None
        self._max_remembered = max_remembered
        self._dummy_hash = self.context.hash(new_secret())
        # client_id -> (stored hash, SHA-256 of the secret that matched it)
        self._verified: dict[str, tuple[str, bytes]] = {}
        # client_id -> (failed verifications, monotonic time of the last), oldest first
        self._failures: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        # Slots per event loop (asyncio futures belong to one loop).
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slots] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"SecretHasher(scheme={self.context.default_scheme()!r}, offload={self.offload})"

    def hash(self, secret: str) -> str:
        """The hash to store for a newly generated ``secret`` (on this thread)."""
        return str(self.context.hash(secret))

    async def ahash(self, secret: str) -> str:
        """``hash(secret)``, in a worker thread when ``offload`` is on (slow schemes)."""
        if not self.offload:
            return self.hash(secret)
        return await asyncio.get_running_loop().run_in_executor(self._pool(), self.hash, secret)

    def remembered(self, client_id: str, secret: str, stored_hash: str) -> bool:
        """Whether ``secret`` already verified against ``stored_hash`` (no passlib work)."""
        seen = self._verified.get(client_id)
        return (
            seen is not None
            and seen[0] == stored_hash
            and hmac.compare_digest(seen[1], hashlib.sha256(secret.encode()).digest())
        )

    def failed(self, client_id: str) -> None:
        """Count a failed verification against ``client_id``: for ``FAILURE_WINDOW``
        seconds after its last failure, its verifications wait behind those of ids
        with fewer failures."""
        now = time.monotonic()
        with self._lock:
            count, last = self._failures.pop(client_id, (0, now))
            if now - last > FAILURE_WINDOW:
                count = 0
            if len(self._failures) >= self._max_remembered:
                self._failures.pop(next(iter(self._failures)), None)
            self._failures[client_id] = (count + 1, now)

    def recent_failures(self, client_id: str) -> int:
        """``client_id``'s failed verifications, none more than ``FAILURE_WINDOW`` s apart."""
        seen = self._failures.get(client_id)
        if seen is None or time.monotonic() - seen[1] > FAILURE_WINDOW:
            return 0
        return seen[0]

    def queued(self) -> int:
        """Verifications waiting for a slot on the running event loop."""
        slots = self._slots.get(asyncio.get_running_loop())
        return 0 if slots is None else slots.waiting

    async def verify(
        self,
        client_id: str,
        secret: str,
        stored_hash: str | None,
        *,
        deadline: float | None = None,
    ) -> bool:
        """Whether ``secret`` matches ``stored_hash``, by a full passlib verification.

        With ``stored_hash=None`` (a key with no secret) the secret is checked
        against a dummy hash, costing the same work, and the answer is
        ``False``. A match is remembered for ``remembered``. With ``offload``
        on, a verification that cannot start within ``deadline`` seconds
        (all ``offload_threads`` busy) raises ``VerificationBusy``. Waiting
        verifications start in order of their id's ``recent_failures`` plus
        the verifications for the same id already waiting or running when
        they came, then of arrival. A mismatch is not counted here: the
        caller decides, with ``failed``, whether the request as a whole failed.
        """
        target = self._dummy_hash if stored_hash is None else stored_hash
        if self.offload:
            loop = asyncio.get_running_loop()
            slots = self._slots.get(loop)
            if slots is None:
                slots = self._slots[loop] = _Slots(self._threads)
            under_way = slots.under_way
            ahead = under_way.get(client_id, 0)
            under_way[client_id] = ahead + 1
            try:
                if not await slots.acquire(self.recent_failures(client_id) + ahead, deadline):
                    raise VerificationBusy(
                        f"no secret verification could start within {deadline:g} s"
                    )
                try:
                    ok = await loop.run_in_executor(
                        self._pool(), self._passlib_verify, secret, target
                    )
                finally:
                    slots.release()
            finally:
                if under_way[client_id] == 1:
                    del under_way[client_id]
                else:
                    under_way[client_id] -= 1
        else:
            ok = self._passlib_verify(secret, target)
        if not ok or stored_hash is None:
            return False
        digest = hashlib.sha256(secret.encode()).digest()
        with self._lock:
            if len(self._verified) >= self._max_remembered:
                self._verified.pop(next(iter(self._verified)), None)
            self._verified[client_id] = (stored_hash, digest)
        return True

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, "keyguard-hash")
        return self._executor

    def _passlib_verify(self, secret: str, stored_hash: str) -> bool:
        try:
            return bool(self.context.verify(secret, stored_hash))
        except (ValueError, TypeError):
            # A hash this context cannot read never matches.
            return False
