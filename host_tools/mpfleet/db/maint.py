"""Keeping the database file sound: check it, copy it while it is in use.

Which room: the database (the SQLite file of mpfleet.db.store). A library: typed, prints
nothing, imports only the standard library, mpfleet.db.schema / mpfleet.db.store and
mpfleet.errors. The CLI is cli/db.py (`mpfleet db check`, `mpfleet db backup`);
docs/dispatch.md ("The database file: check and backup") explains the behaviour to
operators. Issue 13: a damaged file was used as is (serve started, queued nothing;
`job list` ended in a traceback).

What `examine_database` looks at, in order, stopping at the first step that fails:

1. the file: it must exist and be readable (else the check could not run: `checked`
   is False, and nothing is said about damage);
2. its size: an empty file is damaged (SQLite itself takes a 0-byte file for an empty
   database, and `Store` would quietly start a new one in it). The file is never
   opened but by SQLite (closing another descriptor of it would drop the POSIX locks
   of this process's own connections); a wrong header is SQLite's "file is not a
   database";
3. SQLite's own check: `PRAGMA quick_check` (every page of every b-tree, the freelist,
   each record's format; linear in the file's size) or, `quick=False`,
   `PRAGMA integrity_check` (also every index against its table: slower), then
   `PRAGMA foreign_key_check`;
4. that it is mpfleet's: at least one of the tables of mpfleet.db.schema (`TABLES`)
   exists;
5. with `quick=False` only: every row read back, every text value UTF-8 and every
   `*_json` column JSON (mpfleet writes nothing else, so anything else is damage).

What no check can see: SQLite keeps no checksum of what a row holds, so bytes
changed inside a value (a digit of a timestamp, a letter of an envelope) go unseen
when the result is still well-formed. A check finds damage to the file's structure
(whole pages zeroed or overwritten, a truncated file, a wrong header, broken b-tree
pages), which is what makes SQLite fail; tests/host/test_db_maint.py sweeps both kinds.

`backup_database` uses SQLite's online backup API in a single step: one read
transaction on the source, so the copy is one consistent snapshot, and in WAL mode
(mpfleet.db.store's) writers such as `serve` go on meanwhile. Copying in several steps
would let other connections' writes restart the copy from the beginning, possibly
forever on a busy database. The copy goes to a temporary file beside the destination,
is checked (integrity_check and every row), and only then gets its name.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mpfleet.db.schema import TABLES
from mpfleet.db.store import DamagedDatabaseError, StoreError, is_damaged_database

MAX_PROBLEMS = 100                     # a check stops listing after this many
_BUSY_TIMEOUT_S = 10.0                 # how long a check or backup waits for a lock
_UNDECODABLE = ("could not decode to utf-8",)  # Python's words for TEXT that is not UTF-8


class DatabaseUnreadableError(StoreError):
    """The database file is missing or cannot be read, so it could not be checked."""


class BackupError(StoreError):
    """The backup was not made (the destination is untouched)."""


@dataclass
class CheckReport:
    """What `examine_database` found. `checked` False: the check could not run (the
    file is missing, unreadable or locked); `problems` then says why."""

    path: Path
    full: bool
    exists: bool = True
    checked: bool = True
    problems: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    page_size: int | None = None
    pages: int | None = None

    @property
    def sound(self) -> bool:
        return self.checked and not self.problems

    def to_json(self) -> dict:
        return {"database": str(self.path), "mode": "full" if self.full else "quick", "exists": self.exists,
                "checked": self.checked, "sound": self.sound, "problems": list(self.problems),
                "bytes": self.size_bytes, "page_size": self.page_size, "pages": self.pages}


@dataclass
class BackupResult:
    source: Path
    dest: Path
    pages: int
    page_size: int
    size_bytes: int
    seconds: float


# ---------------------------------------------------------------- check
def check_database(path: str | os.PathLike, quick: bool = True) -> list[str]:
    """The problems of the database file at `path`, one line each; empty when it is sound.
    A file that is missing, unreadable or not a database is a problem, not an exception."""
    return examine_database(path, quick=quick).problems


def require_sound_database(path: str | os.PathLike, missing_ok: bool = True) -> None:
    """Raise unless the database at `path` passes the quick check: `DamagedDatabaseError`
    (damage) or `DatabaseUnreadableError` (cannot be read), one line naming the file and
    the reason. A missing file passes when `missing_ok` (a first start creates it). A
    PostgreSQL database is not a file: the server answers for its pages."""
    from mpfleet.db.backend import is_url

    if is_url(path):
        return
    report = examine_database(path, quick=True)
    if report.sound or (not report.exists and missing_ok):
        return
    reason = report.problems[0] + (f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else "")
    if not report.checked:
        raise DatabaseUnreadableError(f"cannot check the database {report.path}: {reason}")
    raise DamagedDatabaseError(f"the database {report.path} is damaged: {reason}; {restore_hint(report.path)}")


def restore_hint(path: str | os.PathLike) -> str:
    """What an operator should do about a damaged database (one clause, no full stop)."""
    return (f"see `mpfleet db check --db {path}`, then stop serve and restore the latest backup "
            "(`mpfleet db backup` makes them)")


def examine_database(path: str | os.PathLike, quick: bool = True) -> CheckReport:
    """Check the database file at `path` (module docstring: the steps). Never creates
    the file, never raises for what is in it."""
    report = CheckReport(Path(path), full=not quick)
    # The file is never opened here but by SQLite: closing any other descriptor of it
    # drops every POSIX lock this process holds on it, under the feet of the process's
    # own connections (serve checks its database while the store is open). Its header
    # is judged by SQLite ("file is not a database").
    try:
        st = os.stat(report.path)
    except FileNotFoundError:
        report.exists = False
        return _unchecked(report, "no such file")
    except OSError as e:
        return _unchecked(report, f"cannot read it: {e.strerror or e}")
    if stat.S_ISDIR(st.st_mode):
        return _unchecked(report, "it is a directory")
    if not os.access(report.path, os.R_OK):
        return _unchecked(report, "cannot read it: Permission denied")
    report.size_bytes = st.st_size
    if report.size_bytes == 0:
        report.problems.append("empty file (0 bytes): truncated, or created and never written "
                               "(if it is new, delete it)")
        return report
    try:
        db = _connect(report.path)
    except sqlite3.Error as e:
        return _sqlite_failed(report, e)
    try:
        _sqlite_checks(db, report, quick)
        if not report.problems:
            _mpfleet_checks(db, report, quick)
    except (sqlite3.Error, MemoryError, UnicodeDecodeError) as e:
        _sqlite_failed(report, e)
    finally:
        db.close()
    del report.problems[MAX_PROBLEMS:]
    return report


def _unchecked(report: CheckReport, reason: str) -> CheckReport:
    report.checked = False
    report.problems.append(reason)
    return report


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw never creates a missing file (a plain connect would). Read-only only when
    # the file is: a read-only connection to a WAL database leaves -wal and -shm behind.
    mode = "rw" if os.access(path, os.W_OK) else "ro"
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True, timeout=_BUSY_TIMEOUT_S,
                         isolation_level=None)
    # SQLite's messages quote damaged names and values: never fail on decoding them.
    db.text_factory = lambda b: b.decode("utf-8", "replace")
    return db


def _sqlite_checks(db: sqlite3.Connection, report: CheckReport, quick: bool) -> None:
    report.page_size = db.execute("PRAGMA page_size").fetchone()[0]
    report.pages = db.execute("PRAGMA page_count").fetchone()[0]
    pragma = "quick_check" if quick else "integrity_check"
    try:
        report.problems += _pragma_check(db, pragma, str(MAX_PROBLEMS))
    except (sqlite3.DatabaseError, MemoryError, UnicodeDecodeError) as e:
        if damage_reason(e) is None and not isinstance(e, MemoryError):
            raise
        # SQLite gave up on the whole file: name the tables it cannot read, one by one.
        report.problems += _tables_failing(db, pragma) or [_damage_text(e)]
    if report.problems:
        return
    for table, rowid, parent, _fk in db.execute("PRAGMA foreign_key_check").fetchmany(MAX_PROBLEMS):
        report.problems.append(f"table {table} row {rowid}: refers to a row of {parent} that does not exist")


def _pragma_check(db: sqlite3.Connection, pragma: str, argument: str, where: str = "") -> list[str]:
    problems = []
    for (text,) in db.execute(f"PRAGMA {pragma}({argument})"):
        for line in str(text).splitlines():
            if line != "ok" and not line.startswith("*** in database"):
                problems.append(f"SQLite {pragma}{where}: {line}")
    return problems


def _tables_failing(db: sqlite3.Connection, pragma: str) -> list[str]:
    """The problems of each table checked alone (with its indexes; SQLite >= 3.33)."""
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    except (sqlite3.Error, MemoryError, UnicodeDecodeError):
        return []  # the schema itself is unreadable: the caller says so
    problems = []
    for table in tables:
        quoted = '"' + table.replace('"', '""') + '"'
        try:
            problems += _pragma_check(db, pragma, quoted, f" of table {table}")
        except (sqlite3.DatabaseError, MemoryError, UnicodeDecodeError) as e:
            if damage_reason(e) is None and not isinstance(e, MemoryError):
                return []  # an SQLite too old to check one table
            problems.append(_damage_text(e, f"table {table}"))
    return problems[:MAX_PROBLEMS]


def _damage_text(e: BaseException, what: str = "it") -> str:
    if what == "it" and str(e) == "file is not a database":
        return ("not an SQLite database: the file does not start with SQLite's header "
                "(zeroed, overwritten, or another kind of file)")
    if isinstance(e, MemoryError):
        return f"SQLite ran out of memory reading {what} (a damaged record claims a huge size)"
    return f"SQLite cannot read {what}: {damage_reason(e)}"


def _mpfleet_checks(db: sqlite3.Connection, report: CheckReport, quick: bool) -> None:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                       "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")]
    if not set(tables) & set(TABLES):
        report.problems.append(f"not an mpfleet database: none of its tables ({', '.join(TABLES)})")
        return
    if not quick:
        for table in ["sqlite_master", *tables]:  # the schema's text too: a damaged name may still parse
            _read_back(db, table, report)
            if len(report.problems) >= MAX_PROBLEMS:
                return


class _NotUtf8:
    """A TEXT value whose bytes are not UTF-8 (what the scan's text_factory returns)."""


_NOT_UTF8 = _NotUtf8()


def _strict_text(raw: bytes):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _NOT_UTF8


def _read_back(db: sqlite3.Connection, table: str, report: CheckReport) -> None:
    """Read every row of `table`: each TEXT value must be UTF-8, each *_json column JSON."""
    name = table.replace('"', '""')
    columns = [r[1] for r in db.execute(f'PRAGMA table_info("{name}")')]
    keys = [r[1] for r in sorted(db.execute(f'PRAGMA table_info("{name}")'), key=lambda r: r[5]) if r[5]]
    try:
        db.execute(f'SELECT rowid FROM "{name}" LIMIT 0')
        key_sql, key_names = "rowid", ["rowid"]
    except sqlite3.OperationalError:  # a WITHOUT ROWID table: its primary key names the row
        key_sql, key_names = ", ".join(f'"{k}"' for k in keys), keys
    db.text_factory = _strict_text
    try:
        for row in db.execute(f'SELECT {key_sql}, * FROM "{name}"'):
            key, values = row[:len(key_names)], row[len(key_names):]
            for column, value in zip(columns, values):
                if value is _NOT_UTF8:
                    bad = "is not UTF-8 text"
                elif column.endswith("_json") and isinstance(value, str) and not _is_json(value):
                    bad = "is not JSON"
                else:
                    continue
                where = ", ".join(f"{k}={v if v is not _NOT_UTF8 else '?'!r}" for k, v in zip(key_names, key))
                report.problems.append(f"table {table} ({where}): column {column} {bad}")
                if len(report.problems) >= MAX_PROBLEMS:
                    return
    finally:
        db.text_factory = lambda b: b.decode("utf-8", "replace")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _sqlite_failed(report: CheckReport, e: BaseException) -> CheckReport:
    """File what SQLite raised: damage is a problem; a lock, an I/O error or a refusal to
    open means the check could not run."""
    if damage_reason(e) is None and not isinstance(e, MemoryError):
        return _unchecked(report, f"SQLite: {e}")
    report.problems.append(_damage_text(e))
    return report


# ---------------------------------------------------------------- damage seen elsewhere
def damage_reason(e: BaseException | None) -> str | None:
    """SQLite's words when `e`, or an exception it was raised from or during, says that a
    database file is damaged; None for any other failure."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if is_damaged_database(e):
            return str(e)
        if isinstance(e, UnicodeDecodeError) and isinstance(e.object, bytes) \
                and e.object.startswith(b"malformed database schema"):
            # SQLite quotes the damaged schema in its message; Python fails to decode it
            return e.object.decode("utf-8", "replace")
        if isinstance(e, sqlite3.OperationalError) and str(e).lower().startswith(_UNDECODABLE):
            return "a TEXT value is not UTF-8 (" + str(e).split(" with text ")[0] + ")"
        e = e.__cause__ or e.__context__
    return None


# ---------------------------------------------------------------- backup
def backup_database(source: str | os.PathLike, dest: str | os.PathLike, force: bool = False) -> BackupResult:
    """Copy the database at `source` to `dest` while others may be writing to it, then
    check the copy (full). `dest` must not exist unless `force`; on any failure nothing
    is left at `dest` (and an existing one is untouched)."""
    source, dest = Path(source), Path(dest)
    started = time.monotonic()
    if not source.is_file():
        raise DatabaseUnreadableError(f"no database at {source}" if not source.exists()
                                      else f"{source} is not a file")
    if dest.is_dir():
        raise BackupError(f"{dest} is a directory: give the backup's file name")
    if not dest.parent.is_dir():
        raise BackupError(f"no directory {dest.parent} for the backup")
    if dest.exists():
        if not force:
            raise BackupError(f"{dest} exists: give --force to replace it")
        if source.resolve() == dest.resolve():
            raise BackupError(f"{dest} is the database itself")
    for suffix in ("-wal", "-journal"):
        # SQLite would apply a leftover log to the new file under that name: damage.
        if Path(f"{dest}{suffix}").exists():
            raise BackupError(f"{dest}{suffix} exists: {dest} is in use or was not closed cleanly; "
                              "not writing there")
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        pages, page_size = _copy(source, tmp)
        report = examine_database(tmp, quick=False)
        if not report.sound:
            raise BackupError(f"the copy of {source} failed its check ({report.problems[0]}): "
                              f"{source} is probably damaged; see `mpfleet db check --db {source}`")
        _place(tmp, dest, force)
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal"), Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
    _sync_dir(dest.parent)
    return BackupResult(source, dest, pages, page_size, dest.stat().st_size, time.monotonic() - started)


def _copy(source: Path, tmp: Path) -> tuple[int, int]:
    try:
        src = _connect(source)
    except sqlite3.Error as e:
        raise DatabaseUnreadableError(f"cannot open the database {source}: {e}") from None
    try:
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(dst)  # pages=-1: one step, one snapshot (module docstring)
            pages = dst.execute("PRAGMA page_count").fetchone()[0]
            page_size = dst.execute("PRAGMA page_size").fetchone()[0]
        finally:
            dst.close()
    except (sqlite3.Error, MemoryError, UnicodeDecodeError) as e:
        reason = damage_reason(e)
        if reason is not None:
            raise DamagedDatabaseError(f"the database {source} is damaged: {reason}; "
                                       f"{restore_hint(source)}") from None
        raise BackupError(f"cannot copy {source}: {e}") from None
    finally:
        src.close()
    with open(tmp, "rb+") as f:  # the backup's own commit syncs; this makes sure of it
        os.fsync(f.fileno())
    return pages, page_size


def _place(tmp: Path, dest: Path, force: bool) -> None:
    if force:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # unlike a rename, never replaces a file that appeared meanwhile
    except FileExistsError:
        raise BackupError(f"{dest} exists: give --force to replace it") from None
    except OSError:  # a file system without hard links
        if dest.exists():
            raise BackupError(f"{dest} exists: give --force to replace it") from None
        os.replace(tmp, dest)


def _sync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every platform can sync a directory
    finally:
        os.close(fd)
