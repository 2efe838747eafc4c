"""The config file and its profiles, through the real `mpfleet` command (docs/cli.md):
flag > MPFLEET_* variable > selected profile > [default] > built-in, and one `mpfleet:`
line (exit 2) for a file that cannot be used. And every command takes its settings the
same way, read from the real click tree, so a command added later with its own --broker
that forgets the variable or the config file fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from cli_harness import SETTING_VARS

from mpfleet.cli import cli
from mpfleet.cli.settings import ENV_VARS, FLAGS



@pytest.fixture
def home(tmp_path):
    """A HOME and XDG_CONFIG_HOME of the test's own, with no MPFLEET_* variable set."""
    (tmp_path / "xdg" / "mpfleet").mkdir(parents=True)
    return tmp_path


def write_config(home: Path, text: str) -> Path:
    path = home / "xdg" / "mpfleet" / "config.toml"
    path.write_text(text)
    return path


def mpfleet(home: Path, *args, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARS}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "xdg"), **env_vars)
    return subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env)


def show(home: Path, *args, **env_vars) -> dict:
    proc = mpfleet(home, *args, "config", "show", "--json", **env_vars)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sources(shown: dict) -> dict:
    return {key: (row["value"], row["source"]) for key, row in shown["settings"].items()}


LAB = """
[default]
broker = "mqtt://10.0.0.2:1883"
db = "/fleets/default.db"

[profile.lab]
db = "/fleets/lab.db"
topic_root = "lab/v1"
"""


def test_without_a_config_file_every_setting_is_built_in(home):
    shown = show(home)
    assert shown["config_file"] == str(home / "xdg" / "mpfleet" / "config.toml")
    assert shown["config_file_exists"] is False
    assert sources(shown) == {
        "db": (str(home / ".mpfleet" / "mpfleet.db"), "built-in"),
        "keys_dir": (str(home / ".mpfleet" / "keys"), "built-in"),
        "images_dir": (str(home / ".mpfleet" / "images"), "built-in"),
        "broker": ("mqtt://127.0.0.1:1883", "built-in"),
        "topic_root": ("mpf/v1", "built-in"),
    }


def test_default_section_applies_without_a_profile(home):
    write_config(home, LAB)
    got = sources(show(home))
    assert got["db"] == ("/fleets/default.db", "default")
    assert got["broker"] == ("mqtt://10.0.0.2:1883", "default")
    assert got["topic_root"] == ("mpf/v1", "built-in")


def test_profile_flag_overrides_default_section_and_falls_back_to_it(home):
    write_config(home, LAB)
    shown = show(home, "--profile", "lab")
    assert shown["profile"] == "lab" and shown["profile_source"] == "flag"
    got = sources(shown)
    assert got["db"] == ("/fleets/lab.db", "profile")
    assert got["topic_root"] == ("lab/v1", "profile")
    assert got["broker"] == ("mqtt://10.0.0.2:1883", "default")


def test_profile_from_environment(home):
    write_config(home, LAB)
    shown = show(home, MPFLEET_PROFILE="lab")
    assert shown["profile"] == "lab" and shown["profile_source"] == "env"
    assert sources(shown)["db"] == ("/fleets/lab.db", "profile")


def test_environment_variable_beats_the_profile(home):
    write_config(home, LAB)
    got = sources(show(home, "--profile", "lab", MPFLEET_DB="/env/m.db", MPFLEET_TOPIC_ROOT="env/v1"))
    assert got["db"] == ("/env/m.db", "env")
    assert got["topic_root"] == ("env/v1", "env")


def test_flag_beats_the_environment_variable(home):
    write_config(home, LAB)
    proc = mpfleet(home, "--profile", "lab", "config", "show", "--json", "--db", "/flag/m.db",
                   "--broker", "mqtt://flag.example:1884", MPFLEET_DB="/env/m.db")
    got = sources(json.loads(proc.stdout))
    assert got["db"] == ("/flag/m.db", "flag")
    assert got["broker"] == ("mqtt://flag.example:1884", "flag")


def test_relative_and_home_paths_in_the_file_are_resolved(home):
    path = write_config(home, '[default]\ndb = "fleet/m.db"\nkeys_dir = "~/k"\n')
    got = sources(show(home))
    assert got["db"] == (str(path.parent / "fleet" / "m.db"), "default")
    assert got["keys_dir"] == (str(home / "k"), "default")


def test_config_show_never_prints_a_broker_password(home):
    write_config(home, '[default]\nbroker = "mqtt://ops:s3cret@10.0.0.2"\n')
    proc = mpfleet(home, "config", "show")
    assert proc.returncode == 0 and "s3cret" not in proc.stdout and "10.0.0.2" in proc.stdout


def test_text_output_names_each_source(home):
    write_config(home, LAB)
    out = mpfleet(home, "--profile", "lab", "config", "show", MPFLEET_KEYS="/env/keys").stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["db"].endswith("(profile lab)")
    assert lines["broker"].endswith("([default])")
    assert lines["keys_dir"].endswith("(env MPFLEET_KEYS)")
    assert lines["images_dir"].endswith("(built-in)")


def test_a_command_uses_the_profile_database(home):
    """Not only `config show`: every command's --db default is the profile's (db check names
    the file it looked at)."""
    write_config(home, f'[profile.lab]\ndb = "{home / "lab.db"}"\n')
    proc = mpfleet(home, "--profile", "lab", "db", "check", "--json")
    assert json.loads(proc.stdout)["database"] == str(home / "lab.db")


def test_a_command_uses_the_profile_topic_root(home):
    """broker config writes the profile's topic root into the ACL it makes."""
    write_config(home, f'[profile.lab]\ndb = "{home / "lab.db"}"\ntopic_root = "lab/v1"\n')
    out = home / "broker"
    proc = mpfleet(home, "--profile", "lab", "broker", "config", "--plaintext", "--out", out, "--device", "dev-1")
    assert proc.returncode == 0, proc.stderr
    acl = "".join(p.read_text() for p in out.rglob("*acl*"))
    assert "lab/v1/" in acl and "mpf/v1/" not in acl


@pytest.mark.parametrize("text, words", [
    ("[default]\ndb = \n", "is not valid TOML"),
    ("[default]\ndatabase = \"x.db\"\n", "unknown key 'database'"),
    ("[profile.lab]\nbrokr = \"mqtt://x\"\n", "unknown key 'brokr' in [profile.lab]"),
    ("[defaults]\ndb = \"x.db\"\n", "unknown section [defaults]"),
    ("[default]\ndb = 5\n", "db must be a non-empty string"),
    ("[default]\nbroker = \"http://x\"\n", "scheme must be mqtt:// or mqtts://"),
    ("[default]\ntopic_root = \"a/#\"\n", "topic_root 'a/#'"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(home, text, words):
    path = write_config(home, text)
    proc = mpfleet(home, "devices", "list")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"mpfleet: {path}") and proc.stderr.count("\n") == 1
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_an_unknown_profile_is_one_line_naming_the_known_ones(home):
    write_config(home, LAB)
    proc = mpfleet(home, "--profile", "prod", "devices", "list")
    assert proc.returncode == 2
    assert proc.stderr == f"mpfleet: no profile 'prod' in {home / 'xdg' / 'mpfleet' / 'config.toml'} " \
                          "(profiles: lab)\n"


def test_an_unknown_profile_from_the_environment_is_refused_too(home):
    proc = mpfleet(home, "devices", "list", MPFLEET_PROFILE="prod")
    assert proc.returncode == 2 and proc.stderr.startswith("mpfleet: no profile 'prod'")


# ------------------------------------------------ every command takes its settings alike

def commands():
    """(command path, click command) of every command under `mpfleet`, groups included."""
    def walk(command, path, ctx):
        yield path, command
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                yield from walk(sub, (*path, name), click.Context(sub, parent=ctx, info_name=name))

    return list(walk(cli, (), click.Context(cli, info_name="mpfleet")))


def setting_options():
    """(command path, setting key, option) of every shared-setting flag in the tree."""
    by_flag = {flag: key for key, flag in FLAGS.items()}
    found = []
    for path, command in commands():
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    if opt in by_flag:
                        found.append((" ".join(path), by_flag[opt], param))
    return found


# deploy's --broker and --topic-root have no default on purpose (a redeploy without one keeps
# each board's own), but they should still take the config file's when it names one:
# default=configured("broker") in cli/usb.py (owned elsewhere).
_DEFAULT_NOT_FROM_CONFIG: set = set()  # every setting flag takes the config file's value


def _ids(rows):
    return [f"{path} {FLAGS[key]}" for path, key, _ in rows]


def test_the_tree_has_the_shared_setting_flags():
    keys = {key for _, key, _ in setting_options()}
    assert keys == set(ENV_VARS), "a setting no command takes"


@pytest.mark.parametrize("path, key, option", setting_options(), ids=_ids(setting_options()))
def test_every_setting_flag_reads_its_environment_variable(path, key, option):
    assert option.envvar == ENV_VARS[key], f"mpfleet {path} {FLAGS[key]} ignores {ENV_VARS[key]}"


@pytest.mark.parametrize("path, key, option", [
    pytest.param(path, key, option, marks=pytest.mark.xfail(strict=True, reason="cli/usb.py: no config default"))
    if (path, key) in _DEFAULT_NOT_FROM_CONFIG else (path, key, option)
    for path, key, option in setting_options()], ids=_ids(setting_options()))
def test_every_setting_flag_defaults_to_the_config_file(path, key, option):
    assert callable(option.default) and option.default.__name__ == f"configured_{key}", \
        f"mpfleet {path} {FLAGS[key]} does not take the config file's {key}"


# ------------------------------------------------ shell completion reads the same database

def complete(home: Path, words: str, **env_vars) -> list[str]:
    """What bash completion offers for the last word of `words` (click's _MPFLEET_COMPLETE)."""
    parts = words.split(" ")
    proc = mpfleet(home, _MPFLEET_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=str(len(parts) - 1),
                   **env_vars)
    assert proc.returncode == 0, proc.stderr
    return [line.split(",", 1)[1] for line in proc.stdout.splitlines() if line]


@pytest.fixture
def fleet(home):
    from mpfleet.db.store import Store
    from mpfleet.fleet.registry import Registry

    db = home / "fleet.db"
    with Store(db) as store:
        registry = Registry(store)
        registry.add("pump-7", groups=["pumps", "north"])
        registry.add("pump-8", groups=["pumps"])
        registry.add("valve-1")
    return db


def test_device_ids_complete_from_the_database(home, fleet):
    assert complete(home, f"mpfleet devices show --db {fleet} pu") == ["pump-7", "pump-8"]


def test_group_names_complete_from_the_database(home, fleet):
    assert complete(home, f"mpfleet devices list --db {fleet} --group ") == ["north", "pumps"]


def test_completion_reads_the_profile_database(home, fleet):
    write_config(home, f'[profile.lab]\ndb = "{fleet}"\n')
    assert complete(home, "mpfleet --profile lab devices show v") == ["valve-1"]
    assert complete(home, "mpfleet devices show v", MPFLEET_PROFILE="lab") == ["valve-1"]


def test_completion_without_a_database_offers_nothing_and_creates_none(home):
    missing = home / "none.db"
    assert complete(home, f"mpfleet devices show --db {missing} p") == []
    assert not missing.exists()


def test_completion_with_a_bad_config_file_offers_nothing(home, fleet):
    write_config(home, "[default\n")
    assert complete(home, "mpfleet devices show p") == []
