"""The documentation is code: README.md and docs/*.md examples are checked as they are
written (tests/docs/doc_examples.py says how a block is marked runnable).

1. Every `mpfleet ...` line of every shell block, and every example in a command's
   `--help`, parses: the command exists, its options exist, each value has its type.
2. Every runnable block runs in a sandbox (its own HOME and config folder, its own
   mosquitto on a free port, its own /tmp) and ends with the documented exit status and
   output. The text is run as written, with two substitutions a reader makes too: the
   broker's `127.0.0.1:1883` becomes the sandbox broker's port, and `/tmp/` the
   sandbox's own folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from doc_examples import DOCUMENTS, REPO, all_blocks, help_examples, mpfleet_commands, shell_blocks

from mpfleet.broker.local import LocalBroker, find_mosquitto, free_port
from mpfleet.cli import cli

# ---------------------------------------------------------------- every command line parses


def parse(args: list[str]) -> None:
    """Parse `mpfleet <args>` down to the last subcommand, converting every value with
    its parameter type, without running anything. Raises click's UsageError (or
    BadParameter) for what a user would be refused."""
    ctx = cli.make_context("mpfleet", list(args), resilient_parsing=False)
    command: click.Command = cli
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx, resilient_parsing=False)


def _is_missing_file(error: click.BadParameter) -> bool:
    # A path the example names that does not exist here (micropython.bin, a board's
    # port): the example is still well formed. Every other bad value is a real error.
    return isinstance(getattr(error.param, "type", None), click.Path)


DOC_COMMANDS = [(block.name, " ".join(args), args) for block in all_blocks() for args in mpfleet_commands(block.text)]


@pytest.mark.parametrize(("where", "line", "args"), DOC_COMMANDS, ids=[f"{w} {line}" for w, line, _ in DOC_COMMANDS])
def test_every_mpfleet_line_of_the_docs_parses(where, line, args):
    try:
        parse(args)
    except click.BadParameter as e:
        if not _is_missing_file(e):
            pytest.fail(f"{where}: `mpfleet {line}`: {e.format_message()}")
    except click.UsageError as e:
        pytest.fail(f"{where}: `mpfleet {line}`: {e.format_message()}")
    except click.exceptions.Exit:
        pass  # --help, --version


_SYNOPSIS = re.compile(r"<[A-Za-z][\w .-]*>|\[--?\w[^\]]*\]")


@pytest.mark.parametrize("block", all_blocks(), ids=lambda b: b.name)
def test_a_shell_block_shows_commands_to_run_not_a_synopsis(block):
    # `<job id>` or `[--full]` cannot be pasted into a shell; a synopsis goes in a
    # ```text block, and an example names a real value
    for number, line in enumerate(block.text.splitlines(), block.line + 1):
        code = line.split(" #", 1)[0]
        found = _SYNOPSIS.search(code)
        assert not found, f"{block.document.relative_to(REPO)}:{number}: {found.group(0)!r} in `{line.strip()}`"


def every_command(group: click.Group = cli, path: tuple[str, ...] = ()):
    ctx = click.Context(group, info_name="mpfleet")
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))


HELP_EXAMPLES = [(" ".join(path), example) for path, command in every_command()
                 for example in help_examples("\n".join(filter(None, (command.help, command.epilog))))]


@pytest.mark.parametrize(("command", "example"), HELP_EXAMPLES, ids=[f"{c}: {e}" for c, e in HELP_EXAMPLES])
def test_every_example_in_a_commands_help_parses(command, example):
    [args] = mpfleet_commands(example) or [[]]
    try:
        parse(args)
    except click.BadParameter as e:
        if not _is_missing_file(e):
            pytest.fail(f"`mpfleet {command} --help` shows `{example}`: {e.format_message()}")
    except click.UsageError as e:
        pytest.fail(f"`mpfleet {command} --help` shows `{example}`: {e.format_message()}")
    except click.exceptions.Exit:
        pass


def test_the_parse_check_refuses_what_a_user_would_be_refused():
    # the check itself can fail: an unknown option, a bad value, an unknown command
    for bad in (["job", "list", "--no-such-option"], ["job", "create", "config", "--rate", "fast"],
                ["no-such-command"]):
        with pytest.raises(click.UsageError):
            parse(bad)


# ---------------------------------------------------------------- runnable blocks

RUNNABLE = {document: [b for b in shell_blocks(document) if b.runnable] for document in DOCUMENTS}
RUNNABLE = {document: blocks for document, blocks in RUNNABLE.items() if blocks}


@pytest.fixture(scope="module")
def doc_broker():
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (make test installs it): runnable examples need a broker")
    with LocalBroker() as broker:
        yield broker


def sandbox_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MPFLEET_")}
    venv_bin = str(Path(sys.executable).parent)
    env.update(HOME=str(root / "home"), XDG_CONFIG_HOME=str(root / "home" / ".config"),
               PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", COLUMNS="120", TERM="dumb",
               PYTHONUNBUFFERED="1")
    return env


def run_block(text: str, root: Path, env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run `text` with bash -e in its own process group; once the script ends, stop
    whatever it left in the background (`serve &`), as a reader's Ctrl-C would. The
    output goes to a file, not a pipe: a background process holds a pipe open."""
    script, log = root / "block.sh", root / "block.out"
    script.write_text("set -e\n" + text)
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", str(script)], cwd=root / "work", env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            for sig in (signal.SIGINT, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(1.0)
            process.wait()
    output = log.read_text(errors="replace")
    if status is None:
        output += f"\n[timed out after {timeout_s:.0f} s]"
    return (-1 if status is None else status), output


_RUN_MOSQUITTO = re.compile(r"^mosquitto -c (\S+)", re.MULTILINE)


def substitute(text: str, root: Path, broker_port: int, tls_port: int) -> str:
    # the documented broker is 127.0.0.1:1883, in a URL or in a device's JSON config; a
    # TLS broker a block starts itself (mosquitto -c ...) listens on 127.0.0.1:8883
    text = (text.replace("127.0.0.1:1883", f"127.0.0.1:{broker_port}").replace('"port": 1883', f'"port": {broker_port}')
            .replace("127.0.0.1:8883", f"127.0.0.1:{tls_port}").replace("/tmp/", f"{root}/tmp/"))
    if os.geteuid() == 0:
        # A reader runs mosquitto as themselves, the owner of the files `broker config`
        # wrote. Started as root (CI), mosquitto would drop to the mosquitto user first
        # and could not read root's 0600 files: tell it to stay root, as LocalBroker does.
        text = _RUN_MOSQUITTO.sub(lambda m: f"{{ echo 'user root'; cat {m.group(1)}; }} > {m.group(1)}.root && "
                                            f"mosquitto -c {m.group(1)}.root", text)
    return text


@pytest.mark.slow
@pytest.mark.parametrize("document", list(RUNNABLE), ids=[str(d.relative_to(REPO)) for d in RUNNABLE])
def test_the_runnable_examples_of_a_document_end_as_documented(document, doc_broker, tmp_path):
    root = tmp_path
    for folder in ("home", "work", "tmp"):
        (root / folder).mkdir()
    (root / "work" / ".venv").symlink_to(Path(sys.executable).parent.parent)  # `. .venv/bin/activate`
    env = sandbox_env(root)
    tls_port = free_port()
    for block in RUNNABLE[document]:
        status, output = run_block(substitute(block.text, root, doc_broker.port, tls_port), root, env,
                                   block.timeout_s)
        shown = f"{block.name}:\n{block.text}\n--- output (exit {status}) ---\n{output[-6000:]}"
        assert status == block.exit, f"exit {status}, documented {block.exit}\n{shown}"
        for pattern in block.expect:
            assert re.search(pattern, output, re.MULTILINE), f"no match for /{pattern}/\n{shown}"
