"""``sqlite://``, ``postgresql://``, ``mysql://`` / ``mariadb://``: keys in a SQL database.

One adapter, on SQLAlchemy 2's async Core, serves the embedded default
(SQLite, a file on one machine) and the shared servers (PostgreSQL,
MariaDB/MySQL) that many app instances use at once. See ``docs/sql-store.md``.

How the rules hold across processes (SPEC §3):

* R2 — each API row carries a counter per kind. Creating a key first runs
  ``UPDATE apis SET <kind>_count = <kind>_count + 1 WHERE name = :api AND
  exposed AND <kind>_count < max_keys_per_kind``: the database row lock makes
  the check and the increment one step, so no two processes can both take
  the last place. The key is inserted in the same transaction; deleting a
  key decrements the counter in its transaction.
* R3 — ``UNIQUE (api, name_key)`` where ``name_key`` is ``name.casefold()``,
  computed in Python so every database folds alike; a rename writes both in
  one ``UPDATE``, so the constraint settles a race between renames too.
* A secret roll (SPEC §8) is one ``UPDATE`` whose new previous hash is the
  row's own old ``secret_hash``: racing rolls are serialized by the row lock.
* R6 — client ids (and API names) compare byte for byte: on MariaDB/MySQL
  the tables use a binary, no-pad collation.
* Listings a page at a time (SPEC §5) are one keyset query each on the index
  ``(api, created_at, id)``, whatever the API's size.
* On PostgreSQL (asyncpg, psycopg) every change also sends a ``pg_notify`` inside its
  own transaction, and the store is a ``ChangeFeed`` (``LISTEN``), so the
  caches of other processes drop what it changed at once (SPEC §11;
  ``_feed.py``). SQLite and MariaDB/MySQL have no feed: their caches are
  bounded by the TTL alone.

Every driver failure becomes :class:`~keyguard.errors.StoreUnavailable`, with
the driver's error chained, within a bounded time set by ``timeout``.
"""

from keyguard.stores.sql._schema import SCHEMA_VERSION
from keyguard.stores.sql._store import SQLStore

__all__ = ["SCHEMA_VERSION", "SQLStore"]
