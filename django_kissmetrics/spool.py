"""A durable local spool: commands that could not be queued or delivered wait here.

One SQLite file (stdlib ``sqlite3``, WAL mode) under ``SPOOL_DIR``, shared by every
process of the site: web processes, their publisher threads and Celery workers. Each
entry is one batch in its wire form, every command with the ``_t`` of its call. An
entry is replayed once: a process *claims* it (a lease, so that the entries of a process
that dies while replaying come back), publishes it, then deletes it.

Only the publisher thread, workers and the ``kissmetrics_spool`` command touch the
spool: never a request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from .commands import Command
from .conf import Settings, get_settings
from .delivery import give_up

logger = logging.getLogger(__name__)

__all__ = [
    "FILENAME",
    "Entry",
    "Spool",
    "SpoolError",
    "Status",
    "default_dir",
    "get_spool",
    "keep",
    "replay",
]

#: The spool's file inside ``SPOOL_DIR``.
FILENAME = "spool.sqlite3"
#: Seconds a claimed entry stays with its claimer; then any process may take it.
LEASE = 60.0
#: Seconds a process waits for another's write before it gives up on the spool.
BUSY_TIMEOUT = 10.0
#: Entries claimed at a time by :func:`replay`.
CHUNK = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    oldest INTEGER NOT NULL,      -- _t of the entry's oldest command
    newest INTEGER NOT NULL,      -- _t of its newest command
    created REAL NOT NULL,        -- when it was spooled (Unix time)
    not_before REAL NOT NULL,     -- no replay before this (Unix time)
    size INTEGER NOT NULL,        -- bytes of payload
    count INTEGER NOT NULL,       -- commands in payload
    payload TEXT NOT NULL,        -- JSON list of Command.to_wire() forms
    claimed_by TEXT,
    claimed_at REAL
)
"""

_T = TypeVar("_T")


class SpoolError(Exception):
    """The spool cannot be opened or written (a folder without permission, a full disk)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One spooled batch."""

    id: int
    commands: list[Command]


@dataclasses.dataclass(frozen=True)
class Status:
    """What the spool holds."""

    count: int  #: Entries (batches).
    commands: int  #: Commands in all entries.
    bytes: int  #: Bytes of their payload.
    oldest: int | None  #: ``_t`` of the oldest command, Unix seconds.
    claimed: int  #: Entries some process is replaying now.


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+.
    if name is not None:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
    # Before 3.11 corruption is the bare DatabaseError; a locked or unwritable file is
    # an OperationalError.
    return type(exc) is sqlite3.DatabaseError


class Spool:
    """The spool file at ``directory/spool.sqlite3``; safe to share between processes.

    A corrupt file is moved aside (``spool.sqlite3.corrupt-<time>-<pid>``) with one
    ERROR line and a fresh spool takes its place. Any other failure to open or write
    raises :class:`SpoolError`.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, max_bytes: int, max_age: float
    ) -> None:
        self.path = Path(directory) / FILENAME
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._inode = 0

    # Connection and corruption.

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None and self._pid == os.getpid():
            return self._db
        if self._db is not None:
            # A connection inherited through fork must be neither used nor closed by the
            # child (closing it could checkpoint and remove the parent's WAL): keep it.
            _inherited.append(self._db)
        self._db, self._pid = None, os.getpid()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.OperationalError) as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from exc
        try:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL survives the crash of any process; only a power cut can
            # lose the last commits.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(_SCHEMA)
            self._inode = os.stat(self.path).st_ino
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _quarantine(self, exc: BaseException) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        try:
            replaced = os.stat(self.path).st_ino != self._inode and self._inode != 0
        except FileNotFoundError:
            replaced = True
        if replaced:
            return  # Another process has moved it aside already: use its fresh spool.
        aside = self.path.with_name(f"{FILENAME}.corrupt-{int(time.time())}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        logger.error(
            "Kissmetrics: the spool %s is unreadable (%s); moved it to %s and started a fresh one",
            self.path,
            exc,
            aside,
        )

    def _run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            for attempt in (1, 2):
                try:
                    return operation(self._connect())
                except sqlite3.DatabaseError as exc:
                    if attempt == 1 and _corrupt(exc):
                        self._quarantine(exc)
                        continue
                    raise SpoolError(f"the spool {self.path} failed: {exc}") from exc
            raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock at once: two claimers cannot read the same
        # free entries before either marks them.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connection (it reopens on next use)."""
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None

    # Operations.

    def put(self, commands: Sequence[Command], *, delay: float = 0.0) -> bool:
        """Spool ``commands`` as one entry, replayable after ``delay`` seconds.

        False when it would take the spool past ``max_bytes`` (nothing is written).
        """
        return self.add(commands, delay=delay) is not None

    def add(self, commands: Sequence[Command], *, delay: float = 0.0) -> int | None:
        """:meth:`put`, returning the new entry's id (``None``: past ``max_bytes``)."""
        payload = json.dumps([c.to_wire() for c in commands], separators=(",", ":"))
        size = len(payload.encode())
        stamps = [c.timestamp for c in commands]
        now = time.time()

        def insert(db: sqlite3.Connection) -> int | None:
            with self._transaction(db):
                (total,) = db.execute("SELECT total(size) FROM entries").fetchone()
                if total + size > self.max_bytes:
                    return None
                cursor = db.execute(
                    "INSERT INTO entries (oldest, newest, created, not_before, size, count,"
                    " payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (min(stamps), max(stamps), now, now + delay, size, len(commands), payload),
                )
            return cursor.lastrowid

        return self._run(insert)

    def claim(self, limit: int = CHUNK) -> list[Entry]:
        """Take up to ``limit`` entries due for replay, oldest first, for :data:`LEASE` s."""
        now = time.time()

        def take(db: sqlite3.Connection) -> list[Entry]:
            with self._transaction(db):
                rows = db.execute(
                    "SELECT id, payload FROM entries WHERE not_before <= ?"
                    " AND (claimed_at IS NULL OR claimed_at < ?) ORDER BY oldest, id LIMIT ?",
                    (now, now - LEASE, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE entries SET claimed_by = ?, claimed_at = ? WHERE id = ?",
                    [(self.owner, now, row[0]) for row in rows],
                )
            return [
                Entry(row[0], [Command.from_wire(c) for c in json.loads(row[1])]) for row in rows
            ]

        return self._run(take)

    def delete(self, ids: Sequence[int]) -> None:
        """Remove entries (replayed, or given up)."""
        self._run(
            lambda db: db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids])
        )

    def release(self, ids: Sequence[int]) -> None:
        """Give back entries this process claimed but could not replay."""
        self._run(
            lambda db: db.executemany(
                "UPDATE entries SET claimed_by = NULL, claimed_at = NULL"
                " WHERE id = ? AND claimed_by = ?",
                [(i, self.owner) for i in ids],
            )
        )

    def status(self) -> Status:
        """Count, commands, bytes, the oldest command's time and the claimed entries."""
        row = self._run(
            lambda db: db.execute(
                "SELECT count(*), total(count), total(size), min(oldest),"
                " count(claimed_at) FROM entries"
            ).fetchone()
        )
        return Status(int(row[0]), int(row[1]), int(row[2]), row[3], int(row[4]))

    def next_due(self) -> float | None:
        """Unix time at which some entry can next be claimed; ``None``: the spool is empty."""
        row = self._run(
            lambda db: db.execute(
                "SELECT min(max(not_before, coalesce(claimed_at + ?, 0))) FROM entries", (LEASE,)
            ).fetchone()
        )
        return None if row[0] is None else float(row[0])

    def purge(self, older_than: float) -> list[Command]:
        """Remove the entries whose every command is ``older_than`` seconds old or more."""
        cutoff = time.time() - older_than

        def remove(db: sqlite3.Connection) -> list[Command]:
            with self._transaction(db):
                rows = db.execute(
                    "SELECT payload FROM entries WHERE newest <= ?", (cutoff,)
                ).fetchall()
                db.execute("DELETE FROM entries WHERE newest <= ?", (cutoff,))
            return [Command.from_wire(c) for row in rows for c in json.loads(row[0])]

        return self._run(remove)


# The spool of this process, per settings.

_spools: dict[tuple[str, int, float], Spool] = {}
_spools_lock = threading.Lock()
_reported: set[str] = set()
_inherited: list[sqlite3.Connection] = []


def _after_fork() -> None:
    # A lock another thread held at the fork would stay held in the child forever.
    global _spools_lock
    _spools_lock = threading.Lock()
    for spool in _spools.values():
        spool._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def default_dir() -> str:
    """``SPOOL_DIR``'s default: a folder under the temp folder, named for the project.

    The project is the name of ``settings.BASE_DIR`` when set, else the package of
    ``ROOT_URLCONF``; the user id keeps two users of one machine apart.
    """
    from django.conf import settings

    base = getattr(settings, "BASE_DIR", None)
    project = Path(base).name if base else str(getattr(settings, "ROOT_URLCONF", "site"))
    project = project.split(".")[0] or "site"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"django-kissmetrics-{project}-{uid}")


def get_spool(conf: Settings | None = None) -> Spool | None:
    """This process's spool; ``None`` when ``ON_ENQUEUE_FAILURE`` is ``"log"``."""
    conf = conf or get_settings()
    if conf.ON_ENQUEUE_FAILURE == "log":
        return None
    key = (conf.SPOOL_DIR or default_dir(), conf.SPOOL_MAX_BYTES, conf.SPOOL_MAX_AGE)
    spool = _spools.get(key)
    if spool is None:
        with _spools_lock:
            spool = _spools.setdefault(
                key, Spool(key[0], max_bytes=conf.SPOOL_MAX_BYTES, max_age=conf.SPOOL_MAX_AGE)
            )
    return spool


def _expired(commands: Sequence[Command], max_age: float) -> tuple[list[Command], list[Command]]:
    cutoff = time.time() - max_age
    fresh = [c for c in commands if c.timestamp >= cutoff]
    return fresh, [c for c in commands if c.timestamp < cutoff]


def _unusable(spool: Spool, exc: SpoolError) -> None:
    # One clear line per cause, not one per batch: each batch is logged by give_up anyway.
    if str(exc) not in _reported:
        _reported.add(str(exc))
        logger.error("Kissmetrics: the spool cannot be used (%s); logging instead", exc)


def keep(
    commands: Sequence[Command],
    error: BaseException | None,
    reason: str,
    *,
    delay: float = 0.0,
) -> bool:
    """Spool ``commands`` (replay after ``delay`` s); give up what cannot be kept.

    Commands past ``SPOOL_MAX_AGE``, a batch that does not fit in ``SPOOL_MAX_BYTES``,
    or every command when the spool is off or unusable are logged at ERROR in full and
    signalled (``delivery_failed``). True when the commands (or the fresh ones) were spooled.
    """
    spool = get_spool()
    if spool is None:
        give_up(commands, error, reason)
        return False
    fresh, old = _expired(commands, spool.max_age)
    give_up(old, error, f"{reason}; older than SPOOL_MAX_AGE")
    if not fresh:
        return False
    try:
        kept = spool.put(fresh, delay=delay)
    except SpoolError as exc:
        _unusable(spool, exc)
        give_up(fresh, error, f"{reason}; spool unusable")
        return False
    if not kept:
        give_up(fresh, error, f"{reason}; the spool is full (SPOOL_MAX_BYTES)")
    else:
        logger.warning("Kissmetrics: spooled %d command(s) (%s): %s", len(fresh), reason, error)
    return kept


def replay(
    spool: Spool, send: Callable[[list[Command]], BaseException | None]
) -> tuple[int, BaseException | None]:
    """Replay due entries, oldest first, through ``send`` (which returns its error or None).

    Stops at the first failure, giving back the entries not yet sent. Commands past
    ``SPOOL_MAX_AGE`` are given up instead. Returns (commands sent, the failure or None).
    """
    sent = 0
    while True:
        entries = spool.claim()
        if not entries:
            return sent, None
        for n, entry in enumerate(entries):
            fresh, old = _expired(entry.commands, spool.max_age)
            give_up(old, None, "spooled past SPOOL_MAX_AGE")
            error = send(fresh) if fresh else None
            if error is not None:
                spool.release([e.id for e in entries[n:]])
                return sent, error
            spool.delete([entry.id])
            sent += len(fresh)
