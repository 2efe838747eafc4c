"""Bad input to `mpfleet` is one line and a non-zero exit, never a traceback: a mistyped
--db is refused rather than made into an empty database, a database the command may not
write and an output file in a missing directory are one `mpfleet:` line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_harness import assert_one_line_error
from cli_harness import mpfleet_at as mpfleet

from mpfleet.db.store import Store

# ------------------------------------------------------------ a mistyped --db on a reading command

# Commands that only read the database (or need what is in it: a job's devices).
READING_COMMANDS = [
    ("samples", "export"),
    ("keys", "list"),
    ("db", "check"),
    ("db", "backup", "{tmp}/backup.db"),
    ("devices", "list"),
    ("devices", "pending"),
    ("devices", "show", "dev-1"),
    ("devices", "tag", "dev-1", "--add", "x"),
    ("devices", "accept", "dev-1"),
    ("job", "list"),
    ("job", "status", "j-1"),
    ("job", "create", "reboot", "--all"),
    ("job", "cancel", "j-1"),
    ("image", "list"),
    ("image", "show", "abc"),
]


@pytest.mark.parametrize("command", READING_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_reading_command_never_creates_a_missing_database(tmp_path, command):
    missing = tmp_path / "typo" / "mpfleet.db"
    args = [a.format(tmp=tmp_path) for a in command]
    proc = mpfleet(tmp_path, *args, "--db", missing)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert not missing.exists() and not missing.parent.exists()


def test_a_missing_database_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "typo.db"
    proc = mpfleet(tmp_path, "samples", "export", "--db", missing)
    assert_one_line_error(proc, f"no database at {missing}")
    assert proc.returncode == 1


def test_keys_init_still_makes_a_new_database(tmp_path):
    fresh = tmp_path / "new" / "mpfleet.db"
    proc = mpfleet(tmp_path, "keys", "init", "--db", fresh, "--keys-dir", tmp_path / "keys")
    assert proc.returncode == 0, proc.stderr
    assert fresh.is_file()


# ------------------------------------------------------------ files the command may not write

@pytest.fixture
def read_only(tmp_path):
    """Make a path read-only for this process: mode 0444 for a user, the immutable
    attribute for root (whom modes do not stop). Undone at the end."""
    made = []

    def make(path: Path) -> Path:
        if os.geteuid() != 0:
            mode = path.stat().st_mode
            path.chmod(0o555 if path.is_dir() else 0o444)
            made.append(lambda: path.chmod(mode))
            return path
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: no way to make a file read-only here")
        made.append(lambda: subprocess.run([chattr, "-i", str(path)], check=True))
        return path

    yield make
    for undo in reversed(made):
        undo()


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "m.db"
    with Store(path) as store:
        store.touch_device("dev-1", board="esp32-devkitc")
        with store.transaction() as db:
            store.add_samples(db, "dev-1", [(1, 1_800_000_000, [21.5, 3.3]), (2, 1_800_000_060, [21.6, 3.3])])
    return path


def test_a_read_only_database_on_a_writing_command_is_one_line(tmp_path, database, read_only):
    read_only(database)
    proc = mpfleet(tmp_path, "devices", "add", "dev-2", "--db", database)
    assert_one_line_error(proc, f"cannot write the database {database}", "readonly")


def test_a_read_only_database_named_by_the_config_file_is_named(tmp_path, database, read_only):
    config = tmp_path / "home" / ".config" / "mpfleet" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[profile.lab]\ndb = "{database}"\n')
    read_only(database)
    proc = mpfleet(tmp_path, "--profile", "lab", "keys", "init")
    assert_one_line_error(proc, f"cannot write the database {database}")


def test_a_read_only_database_can_still_be_read(tmp_path, database, read_only):
    read_only(database)
    proc = mpfleet(tmp_path, "keys", "list", "--db", database, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_export_into_a_missing_directory_is_one_line(tmp_path, database):
    out = tmp_path / "missing" / "dir" / "out.csv"
    proc = mpfleet(tmp_path, "samples", "export", "--db", database, "-o", out)
    assert_one_line_error(proc, f"cannot write {out}", "no directory")
    assert not out.parent.exists()


def test_export_into_a_read_only_directory_is_one_line(tmp_path, database, read_only):
    folder = tmp_path / "out"
    folder.mkdir()
    read_only(folder)
    proc = mpfleet(tmp_path, "samples", "export", "--db", database, "-o", folder / "out.csv")
    assert_one_line_error(proc, f"cannot write {folder / 'out.csv'}")
    assert list(folder.iterdir()) == []


# ------------------------------------------------------------ every command, bad input

def all_commands():
    """(command path, click command) of every command (not group) under `mpfleet`."""
    import click

    from mpfleet.cli import cli

    def walk(command, path, ctx):
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                yield from walk(sub, (*path, name), click.Context(sub, parent=ctx, info_name=name))
        else:
            yield path, command

    return list(walk(cli, (), click.Context(cli, info_name="mpfleet")))


def _garbage_cases():
    """(command path, option flag, bad value kind) for every option whose type checks its text."""
    import click

    cases = []
    for path, command in all_commands():
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag or param.type is click.STRING:
                continue
            kind = "garbage"
            if isinstance(param.type, click.Path):
                if not param.type.dir_okay:
                    kind = "a directory"
                elif not param.type.file_okay:
                    kind = "a file"
                elif param.type.exists:
                    kind = "a missing path"
                else:
                    continue  # any text names a path
            cases.append(pytest.param(path, param.opts[0], kind, id=f"{' '.join(path)} {param.opts[0]} {kind}"))
    return cases


GARBAGE = "#not valid@ \u00e9"


@pytest.mark.parametrize("path, flag, kind", _garbage_cases())
def test_every_checked_option_refuses_a_bad_value_before_the_command_runs(tmp_path, monkeypatch, path, flag, kind):
    """Parsed by click itself (make_context parses without running the command): the value
    is refused with a usage error that names the option, so the command body never sees it."""
    import click

    from mpfleet.cli import cli

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    (tmp_path / "a-file").write_text("x")
    value = {"garbage": GARBAGE, "a directory": str(tmp_path), "a file": str(tmp_path / "a-file"),
             "a missing path": str(tmp_path / "missing")}[kind]
    ctx = click.Context(cli, info_name="mpfleet")
    command = cli
    for name in path:
        command = command.get_command(ctx, name)
        ctx = click.Context(command, parent=ctx, info_name=name)
    with pytest.raises(click.UsageError) as refused:
        command.make_context(path[-1], [flag, value], parent=ctx.parent)
    message = refused.value.format_message()
    assert flag in message or "'" + flag.lstrip("-") in message, message
    assert "\n" not in message.strip()


def _filled_args(command, tmp_path: Path) -> list[str]:
    """Plausible values for a command's required arguments and options, so that a bad --db
    is what the command trips on (not a missing argument)."""
    import click

    args: list[str] = []
    for param in command.params:
        if not param.required or param.name == "db":
            continue
        type_name = type(param.type).__name__
        if isinstance(param.type, click.Path):
            value = str(tmp_path / f"given-{param.name}")
        elif type_name in ("DeviceId", "GroupName"):
            value = "dev-1"
        elif type_name == "JobId":
            value = "j-1"
        elif isinstance(param.type, click.Choice):
            value = str(param.type.choices[0])
        else:
            value = "reboot" if param.name == "type_" else "x"
        args += [param.opts[0], value] if isinstance(param, click.Option) else [value]
    return args


# Commands whose answer to a bad database is not an error line: config show only reports
# the settings; db check's report is its output, with exit codes of its own (below).
_NOT_AN_ERROR_LINE = {("config", "show"), ("db", "check")}


def _db_commands():
    return [pytest.param(path, command, id=" ".join(path)) for path, command in all_commands()
            if any(p.name == "db" for p in command.params) and path not in _NOT_AN_ERROR_LINE]


def assert_clean_failure(proc):
    """Non-zero, no traceback, and either one `mpfleet:` line or click's usage error."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "no message on stderr"
    if lines[0].startswith("mpfleet: "):
        assert len(lines) == 1, proc.stderr
    else:
        assert [line for line in lines if line.startswith("Error: ")], proc.stderr
        assert all(line.startswith(("Usage: ", "Try ", "Error: ")) for line in lines), proc.stderr


@pytest.mark.parametrize("path, command", _db_commands())
def test_every_command_given_a_database_under_a_file_fails_cleanly(tmp_path, path, command):
    """--db FILE/m.db: a database that can be neither read nor made."""
    (tmp_path / "a-file").write_text("not a directory")
    proc = mpfleet(tmp_path, *path, "--db", tmp_path / "a-file" / "m.db", *_filled_args(command, tmp_path),
                   timeout=60)
    assert_clean_failure(proc)


@pytest.mark.parametrize("path, command", _db_commands())
def test_every_command_given_a_damaged_database_fails_cleanly(tmp_path, path, command):
    """--db naming a file that is not a database."""
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not an SQLite database, not even close" * 100)
    proc = mpfleet(tmp_path, *path, "--db", bogus, *_filled_args(command, tmp_path), timeout=60)
    assert_clean_failure(proc)


def test_db_check_reports_a_database_under_a_file_as_unreadable(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    proc = mpfleet(tmp_path, "db", "check", "--db", tmp_path / "a-file" / "m.db")
    assert proc.returncode == 4 and "not checked" in proc.stdout and "Traceback" not in proc.stderr


def test_db_check_reports_a_file_that_is_no_database_as_damaged(tmp_path):
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not an SQLite database, not even close" * 100)
    proc = mpfleet(tmp_path, "db", "check", "--db", bogus)
    assert proc.returncode == 3 and "DAMAGED" in proc.stdout and "Traceback" not in proc.stderr
