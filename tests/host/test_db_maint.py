"""A damaged database is found and said so, never used as is (issue 13): `mpfleet db
check`, `mpfleet db backup`, `require_sound_database` (mpfleet.db.maint) and the one line
every command prints for a damaged file (cli.main).

Every file here is a real mpfleet database (a job rolled out to 40 devices, statuses,
samples) damaged for real, byte by byte or page by page, swept over the whole file.
The promise the sweeps check: no damage is both silent and wrong, i.e. either the check
reports a problem or every row and the schema still read back exactly as before.
The one kind of damage no check sees (a value changed into another well-formed value:
SQLite keeps no checksums of row data) is pinned down by its own test.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpfleet.db import maint as dbmaint
from mpfleet.cli import main
from mpfleet.db.maint import (BackupError, DatabaseUnreadableError, backup_database, check_database,
                             require_sound_database)
from mpfleet.errors import MpfleetError
from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.db.store import DamagedDatabaseError, Store

DEVICES = 40
INTERIOR_PAGES = (2, 5)     # SQLite b-tree page types: interior index, interior table
BTREE_PAGES = (2, 5, 10, 13)  # ... and leaf index, leaf table


# ---------------------------------------------------------------- a real database, and reading it back
@dataclass
class Original:
    path: Path           # the file (only ever read)
    data: bytes          # its bytes, the WAL checkpointed into it
    page_size: int
    tables: list[str]
    contents: dict       # what read_back() returns for it
    keys_dir: Path

    @property
    def pages(self) -> int:
        return len(self.data) // self.page_size

    def query(self, sql: str, *args) -> list[tuple]:
        db = sqlite3.connect(self.path)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def rootpage(self, table: str) -> int:
        return self.query("SELECT rootpage FROM sqlite_master WHERE name = ?", table)[0][0]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    """An mpfleet database as `serve` leaves it: devices, a config job queued to all
    of them (40 executions over several pages), some statuses, samples."""
    root = tmp_path_factory.mktemp("orig")
    path = root / "mpfleet.db"
    store = Store(path)
    ring = KeyRing(store, root / "keys")
    ring.init()
    registry = Registry(store)
    for i in range(DEVICES):
        registry.add(f"dev-{i:02d}", board="virtual", groups=["pumps"])
    engine = RolloutEngine(store, ring, registry)
    engine.create_job("config", {"set": {"sample_interval_s": 30}}, "*", job_id="interval-30")
    engine.tick()
    for r in engine.job_status("interval-30").devices[:10]:
        engine.on_status(r.device, {"job": "interval-30", "seq": r.seq, "status": "SUCCEEDED",
                                       "progress": None, "detail": None, "attempt": 1, "ts": 0})
    with store.transaction() as db:
        store.add_samples(db, "dev-01", [(seq, 1_800_000_000 + seq, [21.5, seq]) for seq in range(1, 60)])
    store.close()  # the last connection checkpoints the WAL into the file and removes it
    assert not Path(f"{path}-wal").exists()
    data = path.read_bytes()
    orig = Original(path, data, 0, [], {}, root / "keys")
    orig.page_size = orig.query("PRAGMA page_size")[0][0]
    orig.tables = [r[0] for r in orig.query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    assert orig.query("SELECT COUNT(*) FROM executions")[0][0] == DEVICES
    orig.contents = read_back(path, orig.tables)
    assert len(executions_pages(orig)) >= 4  # an interior page and its leaves: a real b-tree
    return orig


def read_back(path: Path, tables: list[str]) -> dict:
    """Every row of every table and the schema, or raises what SQLite raises."""
    db = sqlite3.connect(path)
    db.text_factory = bytes  # a damaged text is a difference, not a decoding failure here
    try:
        out = {"schema": sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall(),
                                key=repr)}
        for table in tables:
            out[table] = sorted(db.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)
        return out
    finally:
        db.close()


def reads_correctly(path: Path, orig: Original) -> bool:
    try:
        return read_back(path, orig.tables) == orig.contents
    except (sqlite3.Error, MemoryError, UnicodeDecodeError):
        return False


def write_case(path: Path, data: bytes) -> Path:
    for sidecar in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        sidecar.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


def damaged(orig: Original, offset: int, replacement: bytes) -> bytes:
    data = bytearray(orig.data)
    data[offset:offset + len(replacement)] = replacement
    return bytes(data)


def btree_pages(orig: Original, root: int) -> list[int]:
    """The pages of the b-tree at `root`, walked as SQLite's file format describes:
    an interior page's cells start with a 4-byte child page number, and its 12-byte
    header holds the right-most child at offset 8."""
    pages, todo = [], [root]
    while todo:
        page = todo.pop()
        pages.append(page)
        base = (page - 1) * orig.page_size
        header = base + (100 if page == 1 else 0)
        if orig.data[header] in INTERIOR_PAGES:
            cells = int.from_bytes(orig.data[header + 3:header + 5], "big")
            todo.append(int.from_bytes(orig.data[header + 8:header + 12], "big"))
            for i in range(cells):
                cell = int.from_bytes(orig.data[header + 12 + 2 * i:header + 14 + 2 * i], "big")
                todo.append(int.from_bytes(orig.data[base + cell:base + cell + 4], "big"))
    return sorted(pages)


def executions_pages(orig: Original) -> list[int]:
    return btree_pages(orig, orig.rootpage("executions"))


def structure_ranges(orig: Original) -> list[tuple[int, int]]:
    """(start, end) file offsets of every b-tree page's header and cell pointer array,
    and of the 100-byte file header: the bytes SQLite's structure lives in."""
    roots = [r[0] for r in orig.query("SELECT rootpage FROM sqlite_master WHERE rootpage > 0")]
    pages = sorted({p for root in [1, *roots] for p in btree_pages(orig, root)})
    ranges = [(0, 100)]
    for page in pages:
        header = (page - 1) * orig.page_size + (100 if page == 1 else 0)
        kind = orig.data[header]
        assert kind in BTREE_PAGES
        cells = int.from_bytes(orig.data[header + 3:header + 5], "big")
        ranges.append((header, header + (12 if kind in INTERIOR_PAGES else 8) + 2 * cells))
    return ranges


def assert_never_silent_and_wrong(tmp_path, orig, cases, quick: bool) -> dict:
    """For every (label, data): the check reports a problem, or the file reads as before."""
    path = tmp_path / "case.db"
    silent_and_wrong, tally = [], {"reported": 0, "harmless": 0}
    for label, data in cases:
        write_case(path, data)
        if check_database(path, quick=quick):
            tally["reported"] += 1
        elif reads_correctly(path, orig):
            tally["harmless"] += 1
        else:
            silent_and_wrong.append(label)
    assert not silent_and_wrong, f"damage the check did not report but that changed what reads back: " \
                                 f"{silent_and_wrong[:20]} ({len(silent_and_wrong)} cases)"
    return tally


# ---------------------------------------------------------------- sweeps: the check finds what matters
def test_every_page_zeroed_is_reported_or_harmless(tmp_path, original):
    cases = [(f"page {p} zeroed", damaged(original, (p - 1) * original.page_size, bytes(original.page_size)))
             for p in range(1, original.pages + 1)]
    tally = assert_never_silent_and_wrong(tmp_path, original, cases, quick=True)
    assert tally["reported"] >= len(executions_pages(original))


def test_every_page_overwritten_with_garbage_is_reported_or_harmless(tmp_path, original):
    rng = random.Random(13)
    cases = []
    for p in range(1, original.pages + 1):
        for name, fill in (("random bytes", rng.randbytes(original.page_size)),
                           ("0xff", b"\xff" * original.page_size)):
            cases.append((f"page {p} {name}", damaged(original, (p - 1) * original.page_size, fill)))
    assert_never_silent_and_wrong(tmp_path, original, cases, quick=True)


def test_every_page_of_the_executions_table_damaged_is_reported(tmp_path, original):
    path = tmp_path / "case.db"
    for page in executions_pages(original):
        start = (page - 1) * original.page_size
        for name, fill in (("zeroed", bytes(original.page_size)), ("header 0xff", b"\xff" * 16)):
            write_case(path, damaged(original, start, fill))
            problems = check_database(path)
            assert problems, f"executions page {page} {name}"
            assert any("executions" in p for p in problems), problems  # names what is hit


def test_every_truncation_is_reported_or_harmless(tmp_path, original):
    ps = original.page_size
    cases = [(f"truncated to {n} bytes", original.data[:n])
             for p in range(original.pages) for n in (p * ps, p * ps + 100, p * ps + ps // 2) if n < len(original.data)]
    tally = assert_never_silent_and_wrong(tmp_path, original, cases, quick=True)
    assert tally["harmless"] == 0


@pytest.mark.slow
def test_every_structure_byte_changed_is_reported_or_harmless(tmp_path, original):
    """Each byte of the file header, every b-tree page header and cell pointer array,
    inverted in turn: the structure SQLite's quick_check is there to verify."""
    cases = [(f"byte {pos} inverted", damaged(original, pos, bytes([original.data[pos] ^ 0xFF])))
             for start, end in structure_ranges(original) for pos in range(start, end)]
    assert len(cases) > 500
    assert_never_silent_and_wrong(tmp_path, original, cases, quick=True)


@pytest.mark.slow
def test_bytes_that_are_not_text_inside_rows_are_found_by_the_full_check(tmp_path, original):
    """16 bytes of 0xFF every 128 bytes of the whole file, cell contents included: the
    full check reads every row back, and no TEXT value may hold bytes that are not UTF-8."""
    ps = original.page_size
    cases = [(f"page {p} offset {off}", damaged(original, (p - 1) * ps + off, b"\xff" * 16))
             for p in range(1, original.pages + 1) for off in range(0, ps, 128)]
    assert_never_silent_and_wrong(tmp_path, original, cases, quick=False)


def test_a_well_formed_change_inside_a_value_is_not_seen(tmp_path, original):
    """The limit, stated so nobody relies on more: SQLite keeps no checksum of row data,
    so a value changed into another well-formed value (one letter of an envelope) passes
    every check and reads back changed."""
    envelope = original.query("SELECT envelope FROM executions ORDER BY id LIMIT 1")[0][0].encode()
    offset = original.data.index(envelope) + len(envelope) // 2
    letter = b"A" if original.data[offset:offset + 1] != b"A" else b"B"
    path = write_case(tmp_path / "case.db", damaged(original, offset, letter))
    assert check_database(path, quick=False) == []
    assert not reads_correctly(path, original)


# ---------------------------------------------------------------- the file as a whole
@pytest.mark.parametrize("content, reason", [
    (b"", "empty file (0 bytes)"),
    (b"\0" * 100, "not an SQLite database"),
    (b"this is not a database, it is a shopping list\n" * 100, "not an SQLite database"),
])
def test_a_file_that_is_no_database_is_a_problem_with_its_reason(tmp_path, content, reason):
    path = tmp_path / "m.db"
    path.write_bytes(content)
    problems = check_database(path)
    assert len(problems) == 1 and problems[0].startswith(reason)
    assert path.read_bytes() == content  # the check changed nothing


def test_a_zeroed_file_header_is_a_problem(tmp_path, original):
    path = write_case(tmp_path / "m.db", damaged(original, 0, bytes(100)))
    assert check_database(path)[0].startswith("not an SQLite database")


def test_another_applications_database_is_not_mpfleets(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE shopping (item TEXT)")
    db.close()
    assert check_database(path) == ["not an mpfleet database: none of its tables (devices, samples, acks, "
                                    "ingest_errors, quarantine, keys, device_credentials, jobs, job_targets, "
                                    "executions, job_controls, job_rejects, queue_published, images, strangers, "
                                    "dispatchers, certificates)"]


def test_a_missing_file_is_a_problem_and_is_not_created(tmp_path):
    path = tmp_path / "none.db"
    report = dbmaint.examine_database(path)
    assert report.problems == ["no such file"] and not report.checked and not report.exists
    assert not path.exists()


def test_a_sound_database_has_no_problems_quick_or_full(tmp_path, original):
    path = write_case(tmp_path / "m.db", original.data)
    assert check_database(path) == [] and check_database(path, quick=False) == []


# ---------------------------------------------------------------- require_sound_database (serve's start)
def test_require_sound_database_raises_one_line_naming_the_file(tmp_path, original):
    page = executions_pages(original)[-1]
    path = write_case(tmp_path / "m.db", damaged(original, (page - 1) * original.page_size, b"\xff" * 16))
    with pytest.raises(DamagedDatabaseError) as caught:
        require_sound_database(path)
    message = str(caught.value)
    assert isinstance(caught.value, MpfleetError) and "\n" not in message
    assert message.startswith(f"the database {path} is damaged: ") and "executions" in message
    assert f"mpfleet db check --db {path}" in message


def test_require_sound_database_passes_a_sound_or_missing_file(tmp_path, original):
    require_sound_database(write_case(tmp_path / "m.db", original.data))
    require_sound_database(tmp_path / "first-start.db")  # serve creates it
    with pytest.raises(DatabaseUnreadableError, match="first-start.db: no such file"):
        require_sound_database(tmp_path / "first-start.db", missing_ok=False)


def test_require_sound_database_refuses_an_empty_file(tmp_path):
    (tmp_path / "m.db").write_bytes(b"")
    with pytest.raises(DamagedDatabaseError, match="empty file"):
        require_sound_database(tmp_path / "m.db")


# ---------------------------------------------------------------- mpfleet db check
def run(args, env_db: Path | None = None, keys: Path | None = None):
    env = dict(os.environ)
    env.pop("MPFLEET_DB", None)
    if env_db is not None:
        env["MPFLEET_DB"] = str(env_db)
    if keys is not None:
        env["MPFLEET_KEYS"] = str(keys)
    return subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env)


def test_db_check_exit_codes(tmp_path, original):
    sound = write_case(tmp_path / "sound.db", original.data)
    page = executions_pages(original)[-1]
    bad = write_case(tmp_path / "bad.db", damaged(original, (page - 1) * original.page_size, bytes(16)))
    ok = run(["db", "check", "--db", sound])
    assert ok.returncode == 0 and ok.stdout.startswith(f"sound: {sound}")
    broken = run(["db", "check"], env_db=bad)  # $MPFLEET_DB, as every --db
    assert broken.returncode == 3 and f"DAMAGED: {bad}" in broken.stdout and "executions" in broken.stdout
    missing = run(["db", "check", "--db", tmp_path / "none.db"])
    assert missing.returncode == 4 and "no such file" in missing.stdout and not (tmp_path / "none.db").exists()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    unreadable = run(["db", "check", "--db", not_a_dir / "m.db"])
    assert unreadable.returncode == 4 and "cannot read it" in unreadable.stdout


def test_db_check_json_and_full(tmp_path, original):
    path = write_case(tmp_path / "m.db", original.data)
    out = run(["db", "check", "--db", path, "--full", "--json"])
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["sound"] and report["mode"] == "full" and report["exit_code"] == 0
    assert report["pages"] == original.pages and report["page_size"] == original.page_size
    write_case(path, b"\0" * 4096)
    out = run(["db", "check", "--db", path, "--json"])
    report = json.loads(out.stdout)
    assert out.returncode == 3 and not report["sound"] and report["checked"] and report["problems"]


def test_db_check_help_documents_the_exit_codes():
    out = run(["db", "check", "--help"]).stdout
    for line in ("0  the database is sound", "3  the database is damaged", "4  the file is missing"):
        assert line in out


# ---------------------------------------------------------------- any command: one line, no traceback
@pytest.mark.parametrize("damage", ["executions page", "zeroed header", "garbage", "truncated"])
def test_job_list_on_a_damaged_database_is_one_line(tmp_path, original, damage):
    ps = original.page_size
    page = executions_pages(original)[-1]
    data = {"executions page": damaged(original, (page - 1) * ps, b"\xff" * 16),
            "zeroed header": damaged(original, 0, bytes(100)),
            "garbage": random.Random(1).randbytes(len(original.data)),
            "truncated": original.data[:len(original.data) // 2]}[damage]
    path = write_case(tmp_path / "m.db", data)
    out = run(["job", "list", "--db", path], keys=original.keys_dir)
    assert out.returncode == 1, out.stdout
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("mpfleet: ") and str(path) in out.stderr
    assert f"mpfleet db check --db {path}" in out.stderr and "backup" in out.stderr


def test_job_list_never_shows_a_traceback_for_damage_anywhere(tmp_path, original, capsys):
    """Each executions page zeroed, and 16 bytes of 0xFF every 256 bytes of them: `job
    list` (in this process, through main()) works or says one line, whatever it hits."""
    ps = original.page_size
    path = tmp_path / "m.db"
    cases = [damaged(original, (p - 1) * ps, bytes(ps)) for p in executions_pages(original)]
    cases += [damaged(original, (p - 1) * ps + off, b"\xff" * 16)
              for p in executions_pages(original) for off in range(0, ps, 256)]
    failed = 0
    for data in cases:
        write_case(path, data)
        with pytest.raises(SystemExit) as ended:
            main(["job", "list", "--db", str(path), "--keys-dir", str(original.keys_dir), "--json"])
            raise SystemExit(0)
        err = capsys.readouterr().err
        if ended.value.code:
            failed += 1
            assert ended.value.code == 1 and err.count("\n") == 1 and str(path) in err, err
            assert "mpfleet db check" in err
    assert failed >= len(executions_pages(original))


# ---------------------------------------------------------------- mpfleet db backup
def test_backup_makes_a_checked_copy_with_every_row(tmp_path, original):
    source = write_case(tmp_path / "m.db", original.data)
    result = backup_database(source, tmp_path / "b.db")
    assert (result.pages, result.page_size, result.size_bytes) == \
        (original.pages, original.page_size, len(original.data))
    assert reads_correctly(tmp_path / "b.db", original)
    assert oct((tmp_path / "b.db").stat().st_mode & 0o777) == "0o600"  # it holds broker passwords
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.db", "m.db"]


def test_backup_refuses_an_existing_destination_unless_forced(tmp_path, original):
    source = write_case(tmp_path / "m.db", original.data)
    dest = tmp_path / "b.db"
    dest.write_bytes(b"yesterday's backup")
    with pytest.raises(BackupError, match="exists: give --force"):
        backup_database(source, dest)
    assert dest.read_bytes() == b"yesterday's backup"
    backup_database(source, dest, force=True)
    assert reads_correctly(dest, original)


def test_backup_refuses_a_destination_with_a_leftover_log(tmp_path, original):
    source = write_case(tmp_path / "m.db", original.data)
    Path(f"{tmp_path / 'b.db'}-wal").write_bytes(b"")
    with pytest.raises(BackupError, match="b.db-wal exists"):
        backup_database(source, tmp_path / "b.db", force=True)
    assert not (tmp_path / "b.db").exists()


def test_a_failed_backup_leaves_no_file(tmp_path, original):
    page = executions_pages(original)[-1]
    source = write_case(tmp_path / "m.db", damaged(original, (page - 1) * original.page_size, bytes(16)))
    with pytest.raises(BackupError, match="failed its check"):
        backup_database(source, tmp_path / "b.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.db"]  # no b.db, no temporary file
    with pytest.raises(DatabaseUnreadableError):
        backup_database(tmp_path / "none.db", tmp_path / "b.db")
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_backup_while_another_connection_writes(tmp_path, monkeypatch):
    """Like `serve` committing while the operator backs up: the writer is never held up
    and the copy is one consistent snapshot (its rows are exactly 1..k of the writer's)."""
    path = tmp_path / "m.db"
    with Store(path) as store, store.transaction() as db:  # ~8 MB, so the copy takes a while
        store.add_samples(db, "bulk", [(seq, seq, ["x" * 100]) for seq in range(1, 60_000)])
    copy_window = []
    real_copy = dbmaint._copy

    def timed_copy(source, tmp):
        copy_window.append(time.monotonic())
        try:
            return real_copy(source, tmp)
        finally:
            copy_window.append(time.monotonic())

    monkeypatch.setattr(dbmaint, "_copy", timed_copy)
    commits: list[float] = []
    stop = threading.Event()

    def writer():
        with Store(path) as store:
            seq = 0
            while not stop.is_set():
                seq += 1
                with store.transaction() as db:
                    store.add_samples(db, "writer", [(seq, seq, [seq])])
                commits.append(time.monotonic())

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(commits) < 20:
            time.sleep(0.001)
        result = backup_database(path, tmp_path / "b.db")
    finally:
        stop.set()
        thread.join(10)
    start, end = copy_window
    during = [t for t in commits if start <= t <= end]
    assert during, f"no commit while the copy ran ({end - start:.3f} s)"
    assert check_database(tmp_path / "b.db", quick=False) == []
    with sqlite3.connect(tmp_path / "b.db") as copy:
        seqs = [r[0] for r in copy.execute("SELECT seq FROM samples WHERE device = 'writer' ORDER BY seq")]
        bulk = copy.execute("SELECT COUNT(*) FROM samples WHERE device = 'bulk'").fetchone()[0]
    assert bulk == 59_999 and seqs == list(range(1, len(seqs) + 1)) and 20 <= len(seqs) < len(commits)
    assert result.pages > 1000


def test_db_backup_cli(tmp_path, original):
    source = write_case(tmp_path / "m.db", original.data)
    out = run(["db", "backup", tmp_path / "b.db", "--db", source])
    assert out.returncode == 0
    assert f"{len(original.data)} bytes, {original.pages} pages of {original.page_size} bytes" in out.stdout
    again = run(["db", "backup", tmp_path / "b.db", "--db", source])
    assert again.returncode == 1 and again.stderr == f"mpfleet: {tmp_path / 'b.db'} exists: give --force to " \
                                                     "replace it\n"
    forced = run(["db", "backup", tmp_path / "b.db", "--db", source, "--force", "--json"])
    assert forced.returncode == 0 and json.loads(forced.stdout)["pages"] == original.pages
