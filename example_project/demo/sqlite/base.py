"""The SQLite backend with immediate transactions and WAL (see the package docstring)."""

from __future__ import annotations

from typing import Any

from django.db.backends.sqlite3 import base


class DatabaseWrapper(base.DatabaseWrapper):
    """Django's SQLite backend, beginning transactions with ``BEGIN IMMEDIATE``."""

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        """A new connection in WAL mode."""
        connection = super().get_new_connection(conn_params)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def _start_transaction_under_autocommit(self) -> None:
        # What Django 5.1 runs with OPTIONS["transaction_mode"] = "IMMEDIATE".
        self.cursor().execute("BEGIN IMMEDIATE")
