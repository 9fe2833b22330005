"""A durable local spool: commands that could not be queued or delivered wait here.

One SQLite file (stdlib ``sqlite3``, WAL mode) under ``SPOOL_DIR``, shared by every
process of the site: web processes, their publisher threads and Celery workers. Each
entry is one batch in its wire form, every command with the ``_t`` of its call, and the
API key it was made with: a process replays only its own key's entries. An entry is
replayed once: a process *claims* it (a lease, so that the entries of a process that
dies while replaying come back), publishes it, then deletes it. An entry that cannot be
read back is moved to the ``quarantine`` table, with one ERROR line.

The folder holds people's identities and properties: it is created 0700 and its files
0600, and a folder this process's user does not own alone (another owner, group or
other access, a symbolic link) is refused, with nothing written there.

Only the publisher thread, workers and the ``kissmetrics_spool`` command touch the
spool: never a request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .commands import PATHS, Command
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
    "folder_problem",
    "get_spool",
    "keep",
    "parse",
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
    claimed_at REAL,
    api_key TEXT                  -- the key its commands were made with (NULL: unknown)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    entry INTEGER NOT NULL,       -- the entry's id in entries
    created REAL NOT NULL,        -- when the entry was spooled
    quarantined REAL NOT NULL,    -- when it was moved here
    reason TEXT NOT NULL,
    api_key TEXT,
    payload TEXT
);
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
    other_keys: int = 0  #: Entries made with another API key: left for their own site.
    quarantined: int = 0  #: Entries that could not be read back, kept aside.


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+.
    if name is not None:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
    # Before 3.11 corruption is the bare DatabaseError; a locked or unwritable file is
    # an OperationalError.
    return type(exc) is sqlite3.DatabaseError


def folder_problem(directory: str | os.PathLike[str]) -> str | None:
    """What makes ``directory`` unfit for the spool, with the fix; ``None``: fit or absent.

    Fit: a real folder (not a symbolic link) owned by this process's user, with no
    group or other permission bits. Nothing is created or changed.
    """
    path = Path(directory)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"the spool folder {path} cannot be read ({exc.strerror})"
    fix = (
        "remove it, or set KISSMETRICS['SPOOL_DIR'] to a folder of your own "
        "(it is created with mode 0700)"
    )
    if stat.S_ISLNK(info.st_mode):
        return f"the spool folder {path} is a symbolic link, which is not used: {fix}"
    if not stat.S_ISDIR(info.st_mode):
        return f"the spool folder {path} is not a folder: {fix}"
    uid = _uid()
    if uid is None:
        return None  # Windows: no owner ids and no mode bits to check.
    if info.st_uid != uid:
        return (
            f"the spool folder {path} belongs to user id {info.st_uid}, not to this "
            f"process's user ({uid}): {fix}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (
            f"the spool folder {path} has mode {mode:04o}; group and others must have "
            f"no access: "
            f"run chmod 700 {path} (or remove it)"
        )
    return None


def _uid() -> int | None:
    geteuid = getattr(os, "geteuid", None)  # Not on Windows, which has no modes either.
    return None if geteuid is None else int(geteuid())


def _own_folder(directory: Path) -> None:
    """Create ``directory`` (0700), or make sure the one there is fit; else raise."""
    directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        # The mode is applied at creation (less the umask, which can only take bits
        # away): there is no moment at which the folder is open to others.
        directory.mkdir(mode=0o700)
    problem = folder_problem(directory)
    if problem is not None:
        raise SpoolError(problem)


def _own_files(path: Path) -> None:
    """Create the spool file 0600 before SQLite does; tighten the mode of older files.

    SQLite gives its -wal and -shm files the mode of the database file, so they are
    0600 too.
    """
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpoolError(f"the spool file {path} is not a regular file: remove it")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)  # Written by an earlier version, with the umask's mode.
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        other = Path(f"{path}{suffix}")
        try:
            info = os.lstat(other)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            raise SpoolError(f"the spool file {other} is not a regular file: remove it")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(other, 0o600)


class Spool:
    """The spool file at ``directory/spool.sqlite3``; safe to share between processes.

    A corrupt file is moved aside (``spool.sqlite3.corrupt-<time>-<pid>``) with one
    ERROR line and a fresh spool takes its place. Any other failure to open or write
    raises :class:`SpoolError`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_age: float,
        api_key: str | None = None,
        site_keys: frozenset[str] | None = frozenset(),
    ) -> None:
        self.path = Path(directory) / FILENAME
        self.max_bytes = max_bytes
        self.max_age = max_age
        #: The key this process sends with: entries made with another are not its own.
        self.api_key = api_key
        #: The other keys of this site's settings (``SITES``) whose entries it replays;
        #: ``None``: any key (``SITES`` is a function, whose keys cannot be listed).
        self.site_keys = site_keys
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
            _own_folder(self.path.parent)
            _own_files(self.path)
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
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
            if "api_key" not in columns:  # A spool written before keys were recorded.
                db.execute("ALTER TABLE entries ADD COLUMN api_key TEXT")
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

    def _key_of(self, command: Command) -> str | None:
        # A command that names its own key (several sites in one process) keeps it.
        return getattr(command, "api_key", None) or self.api_key

    def _mine(self) -> tuple[str, tuple[Any, ...]]:
        """The SQL condition, and its parameters, of the entries this process may replay."""
        if self.site_keys is None:
            return "1", ()
        keys = sorted(k for k in {self.api_key, *self.site_keys} if k is not None)
        if not keys:
            return "api_key IS NULL", ()
        # NULL: spooled before keys were recorded, into this site's own folder.
        return f"(api_key IS NULL OR api_key IN ({', '.join('?' * len(keys))}))", tuple(keys)

    def put(self, commands: Sequence[Command], *, delay: float = 0.0) -> bool:
        """Spool ``commands`` as one entry per API key, replayable after ``delay`` seconds.

        False when it would take the spool past ``max_bytes`` (nothing is written).
        """
        return self.add(commands, delay=delay) is not None

    def add(self, commands: Sequence[Command], *, delay: float = 0.0) -> list[int] | None:
        """:meth:`put`, returning the new entries' ids (``None``: past ``max_bytes``)."""
        by_key: dict[str | None, list[Command]] = {}
        for command in commands:
            by_key.setdefault(self._key_of(command), []).append(command)
        now = time.time()
        rows = []
        for key, group in by_key.items():
            payload = json.dumps([c.to_wire() for c in group], separators=(",", ":"))
            stamps = [c.timestamp for c in group]
            size = len(payload.encode())
            rows.append(
                (min(stamps), max(stamps), now, now + delay, size, len(group), payload, key)
            )
        size = sum(row[4] for row in rows)

        def insert(db: sqlite3.Connection) -> list[int] | None:
            with self._transaction(db):
                (total,) = db.execute("SELECT total(size) FROM entries").fetchone()
                if total + size > self.max_bytes:
                    return None
                ids = []
                for row in rows:
                    cursor = db.execute(
                        "INSERT INTO entries (oldest, newest, created, not_before, size,"
                        " count, payload, api_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    ids.append(int(cursor.lastrowid or 0))
            return ids

        return self._run(insert)

    def claim(self, limit: int = CHUNK) -> list[Entry]:
        """Take up to ``limit`` entries due for replay, oldest first, for :data:`LEASE` s.

        Only this process's own API key's entries. Each is read back on its own: one
        that cannot be (a malformed payload) is moved to the quarantine table with one
        ERROR line, and the others are taken.
        """
        now = time.time()
        mine, keys = self._mine()

        def take(db: sqlite3.Connection) -> tuple[list[Entry], list[tuple[int, str]]]:
            with self._transaction(db):
                rows = db.execute(
                    f"SELECT id, payload FROM entries WHERE {mine} AND not_before <= ?"
                    " AND (claimed_at IS NULL OR claimed_at < ?) ORDER BY oldest, id LIMIT ?",
                    (*keys, now, now - LEASE, limit),
                ).fetchall()
                entries, bad = _read(rows)
                self._quarantine_rows(db, bad, now)
                db.executemany(
                    "UPDATE entries SET claimed_by = ?, claimed_at = ? WHERE id = ?",
                    [(self.owner, now, entry.id) for entry in entries],
                )
            return entries, bad

        entries, bad = self._run(take)
        self._report(bad)
        return entries

    @staticmethod
    def _quarantine_rows(
        db: sqlite3.Connection, bad: Sequence[tuple[int, str]], now: float
    ) -> None:
        for entry_id, reason in bad:
            db.execute(
                "INSERT INTO quarantine (entry, created, quarantined, reason, api_key, payload)"
                " SELECT id, created, ?, ?, api_key, payload FROM entries WHERE id = ?",
                (now, reason, entry_id),
            )
            db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))

    def _report(self, bad: Sequence[tuple[int, str]]) -> None:
        for entry_id, reason in bad:
            logger.error(
                "Kissmetrics: spool entry %d of %s is malformed (%s); moved it to the "
                "quarantine table and replaying the others",
                entry_id,
                self.path,
                reason,
            )

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
        """What this key's entries hold; how many are another key's; how many are aside."""
        mine, keys = self._mine()

        def read(db: sqlite3.Connection) -> Status:
            row = db.execute(
                "SELECT count(*), total(count), total(size), min(oldest),"
                f" count(claimed_at) FROM entries WHERE {mine}",
                keys,
            ).fetchone()
            (others,) = db.execute(
                f"SELECT count(*) FROM entries WHERE NOT {mine}", keys
            ).fetchone()
            (aside,) = db.execute("SELECT count(*) FROM quarantine").fetchone()
            return Status(
                int(row[0]), int(row[1]), int(row[2]), row[3], int(row[4]), int(others), aside
            )

        return self._run(read)

    def next_due(self) -> float | None:
        """Unix time at which one of this key's entries can next be claimed; ``None``: none."""
        mine, keys = self._mine()
        row = self._run(
            lambda db: db.execute(
                "SELECT min(max(not_before, coalesce(claimed_at + ?, 0))) FROM entries"
                f" WHERE {mine}",
                (LEASE, *keys),
            ).fetchone()
        )
        return None if row[0] is None else float(row[0])

    def purge(self, older_than: float) -> list[Command]:
        """Remove the entries whose every command is ``older_than`` seconds old or more.

        ``0`` removes every entry, those timed in the future too. Malformed entries go
        to the quarantine table rather than being dropped unseen.
        """
        cutoff = time.time() - older_than
        where, params = ("1", ()) if older_than <= 0 else ("newest <= ?", (cutoff,))

        def remove(db: sqlite3.Connection) -> tuple[list[Command], list[tuple[int, str]]]:
            with self._transaction(db):
                rows = db.execute(f"SELECT id, payload FROM entries WHERE {where}", params)
                entries, bad = _read(rows.fetchall())
                self._quarantine_rows(db, bad, time.time())
                db.execute(f"DELETE FROM entries WHERE {where}", params)
            return [c for entry in entries for c in entry.commands], bad

        dropped, bad = self._run(remove)
        self._report(bad)
        return dropped


def _read(rows: Sequence[tuple[int, object]]) -> tuple[list[Entry], list[tuple[int, str]]]:
    """Each row as an entry, one by one; the ones that cannot be read, with why."""
    entries: list[Entry] = []
    bad: list[tuple[int, str]] = []
    for entry_id, payload in rows:
        try:
            entries.append(Entry(entry_id, parse(payload)))
        except ValueError as exc:
            bad.append((entry_id, str(exc)))
    return entries, bad


def parse(payload: object) -> list[Command]:
    """The commands of a spooled payload, each checked; ``ValueError`` naming the fault.

    A spool is a file on disk: whatever is in it is read as untrusted input, so that a
    damaged or planted entry cannot reach the tracker as something it is not.
    """
    try:
        data = json.loads(payload) if isinstance(payload, (str, bytes)) else None
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(data, list) or not data:
        raise ValueError("not a list of commands")
    return [_command(item, n) for n, item in enumerate(data)]


def _command(item: object, n: int) -> Command:
    # The wire form: [kind, person, name, properties, timestamp, ...fields added later].
    if not isinstance(item, list) or len(item) < 5:
        raise ValueError(f"command {n} is not a command")
    kind, person, name, properties, timestamp = item[:5]
    if kind not in PATHS:
        raise ValueError(f"command {n} has an unknown kind {str(kind)[:20]!r}")
    if not _is_name(person):
        raise ValueError(f"command {n} has no valid person")
    if kind == "set" and name is not None:
        raise ValueError(f"command {n} is a set with a name")
    if kind != "set" and not _is_name(name):
        raise ValueError(f"command {n} has no valid name")
    if not isinstance(properties, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in properties.items()
    ):
        raise ValueError(f"command {n} has properties that are not text")
    if type(timestamp) is not int or not 0 <= timestamp < 2**40:
        raise ValueError(f"command {n} has no valid time")
    try:
        return Command.from_wire(item)
    except (TypeError, ValueError):
        raise ValueError(f"command {n} is not a command") from None


def _is_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 1024


# The spool of this process, per settings.

_spools: dict[tuple[str, int, float, str | None, frozenset[str] | None], Spool] = {}
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
    """``SPOOL_DIR``'s default: a folder of this site's own under the temp folder.

    Named ``django-kissmetrics-<project>-<uid>-<hash>``: the hash is of the absolute
    ``settings.BASE_DIR`` (else of the settings module), so two sites whose folders have
    the same name keep apart; the user id keeps two users of one machine apart.
    """
    from django.conf import settings

    base = getattr(settings, "BASE_DIR", None)
    if base:
        where = os.path.abspath(os.fspath(base))
        project = Path(where).name
    else:
        where = str(getattr(settings, "SETTINGS_MODULE", None) or settings.ROOT_URLCONF)
        project = where.split(".")[0]
    project = re.sub(r"[^A-Za-z0-9_.-]", "_", project)[:40] or "site"
    digest = hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    uid = _uid() or 0
    return os.path.join(tempfile.gettempdir(), f"django-kissmetrics-{project}-{uid}-{digest}")


def get_spool(conf: Settings | None = None) -> Spool | None:
    """This process's spool; ``None`` when ``ON_ENQUEUE_FAILURE`` is ``"log"``."""
    conf = conf or get_settings()
    if conf.ON_ENQUEUE_FAILURE == "log":
        return None
    sites = conf.SITES
    site_keys = (
        None
        if isinstance(sites, str)
        else frozenset(k for k in (sites or {}).values() if k is not None)
    )
    key = (
        conf.SPOOL_DIR or default_dir(),
        conf.SPOOL_MAX_BYTES,
        conf.SPOOL_MAX_AGE,
        conf.API_KEY,
        site_keys,
    )
    spool = _spools.get(key)
    if spool is None:
        with _spools_lock:
            spool = _spools.setdefault(
                key,
                Spool(
                    key[0],
                    max_bytes=conf.SPOOL_MAX_BYTES,
                    max_age=conf.SPOOL_MAX_AGE,
                    api_key=conf.API_KEY,
                    site_keys=site_keys,
                ),
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
