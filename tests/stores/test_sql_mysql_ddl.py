"""The tables' DDL as SQLAlchemy writes it for MySQL 8, which this machine does not run
(its server is MariaDB): a TEXT column's default must be an expression there."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects.mysql import asyncmy
from sqlalchemy.schema import CreateTable

from keyguard.stores.sql._schema import _Schema
from keyguard.stores.sql._upgrades import V2_API_COLUMNS, V2_KEY_COLUMNS, column_spec


def _dialect(*, mariadb: bool) -> asyncmy.dialect:
    dialect = asyncmy.dialect()
    dialect.is_mariadb = mariadb
    dialect.server_version_info = (10, 11, 6) if mariadb else (8, 0, 36)
    dialect._support_default_function = True  # as initialize() finds on 8.0.13+
    return dialect


@pytest.mark.parametrize(
    ("mariadb", "meta", "limits"),
    [(False, "DEFAULT ('{}')", "DEFAULT ('[]')"), (True, "DEFAULT '{}'", "DEFAULT '[]'")],
    ids=["mysql", "mariadb"],
)
def test_text_defaults_as_each_server_takes_them(mariadb: bool, meta: str, limits: str) -> None:
    """MySQL refuses ``TEXT … DEFAULT '{}'`` (error 1101: a TEXT column takes a default
    only written as an expression), so the tables could not be created there at all;
    MySQL gets ``DEFAULT ('{}')``, MariaDB the literal default existing tables were made
    with."""
    dialect = _dialect(mariadb=mariadb)
    schema = _Schema("kg_", dialect)
    keys = str(CreateTable(schema.keys).compile(dialect=dialect))
    apis = str(CreateTable(schema.apis).compile(dialect=dialect))
    assert f"meta TEXT NOT NULL {meta}" in keys
    assert f"rate_limits TEXT NOT NULL {limits}" in apis


def test_the_version_2_upgrade_writes_mysqls_text_defaults_as_expressions() -> None:
    """The version 2 step's ``ADD COLUMN`` on MySQL: TEXT defaults as expressions; on
    MariaDB as they were."""
    meta = V2_KEY_COLUMNS["meta"]
    assert column_spec(meta, "mysql", mysql=True) == "TEXT NOT NULL DEFAULT ('{}')"
    assert column_spec(meta, "mysql") == "TEXT NOT NULL DEFAULT '{}'"
    limits = V2_API_COLUMNS["rate_limits"]
    assert column_spec(limits, "mysql", mysql=True) == "TEXT NOT NULL DEFAULT ('[]')"
    assert column_spec(V2_KEY_COLUMNS["enabled"], "mysql", mysql=True) == "BOOL NOT NULL DEFAULT 1"
