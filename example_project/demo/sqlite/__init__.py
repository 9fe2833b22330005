"""SQLite for the demo on Django < 5.1: what 5.1's ``transaction_mode`` and ``init_command`` do.

The stand-in tracker writes each hit from another ``runserver`` thread while a page may be
in a transaction that read first and writes next (``update_or_create``). With SQLite's
default deferred transactions that upgrade fails at once with "database is locked";
``BEGIN IMMEDIATE`` and WAL make SQLite queue the writers instead.
"""
