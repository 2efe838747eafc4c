"""The CLI's settings: the config file, its profiles, and where each effective value came from.

Which room: cli (the config file is the command line's own: the library takes its
paths and URLs as arguments). Imports errors, protocol and broker, to check values
with their owners' parsers.

The file is TOML at $XDG_CONFIG_HOME/mpfleet/config.toml (default
~/.config/mpfleet/config.toml), read with the standard library's tomllib (Python
3.11+; on 3.10 an existing file is refused with one line, as mpfleet has no TOML
dependency of its own)::

    [default]                 # applies to every profile
    broker = "mqtt://10.0.0.2"

    [profile.lab]             # mpfleet --profile lab ..., or MPFLEET_PROFILE=lab
    db = "~/fleets/lab.db"    # ~ is expanded; a relative path is relative to this file
    topic_root = "lab/v1"

Keys: db, keys_dir, images_dir, broker, topic_root. Precedence, highest first: the
flag, its MPFLEET_* environment variable, the selected profile, [default], the
built-in default. Flags and environment variables are click's (the shared options of
cli/options.py name the variable); this module supplies the last three layers as the
options' default. docs/cli.md is the user's page.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from mpfleet.errors import MpfleetError

# Every setting the file may hold, and the environment variable of its flag.
ENV_VARS = {
    "db": "MPFLEET_DB",
    "keys_dir": "MPFLEET_KEYS",
    "images_dir": "MPFLEET_IMAGES",
    "broker": "MPFLEET_BROKER",
    "topic_root": "MPFLEET_TOPIC_ROOT",
}
FLAGS = {"db": "--db", "keys_dir": "--keys-dir", "images_dir": "--images-dir", "broker": "--broker",
         "topic_root": "--topic-root"}
PATH_SETTINGS = frozenset({"db", "keys_dir", "images_dir"})
BUILT_IN_BROKER = "mqtt://127.0.0.1:1883"
BUILT_IN_TOPIC_ROOT = "mpf/v1"
PROFILE_ENV = "MPFLEET_PROFILE"

# Where a value came from, as `config show` names it.
FROM_FLAG, FROM_ENV, FROM_PROFILE, FROM_DEFAULT_SECTION, FROM_BUILT_IN = (
    "flag", "env", "profile", "default", "built-in")

_META_KEY = "mpfleet.settings"  # the loaded Settings, kept on the root click context


class ConfigError(MpfleetError):
    """The config file cannot be used: bad TOML, an unknown key or profile. A usage error (exit 2)."""

    exit_code = 2


def config_path() -> Path:
    """$XDG_CONFIG_HOME/mpfleet/config.toml, ~/.config/mpfleet/config.toml without it."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mpfleet" / "config.toml"


@dataclass(frozen=True)
class Settings:
    """The config file's layers for one selected profile."""

    path: Path
    exists: bool
    profile: str | None  # the selected [profile.NAME], or None
    profile_source: str | None  # FROM_FLAG or FROM_ENV when a profile is selected
    defaults: dict = field(default_factory=dict)  # the [default] section, checked
    selected: dict = field(default_factory=dict)  # the selected profile's section, checked
    profiles: tuple = ()  # every profile the file names

    def lookup(self, key: str) -> tuple[str | None, str]:
        """The configured value of `key` and its layer: the profile, [default], or (None, built-in)."""
        if key in self.selected:
            return self.selected[key], FROM_PROFILE
        if key in self.defaults:
            return self.defaults[key], FROM_DEFAULT_SECTION
        return None, FROM_BUILT_IN


def load_settings(profile: str | None = None, profile_source: str | None = None,
                  path: Path | None = None) -> Settings:
    """Read and check the config file (a missing one is empty) for `profile`."""
    path = path or config_path()
    if profile is None and os.environ.get(PROFILE_ENV):
        profile, profile_source = os.environ[PROFILE_ENV], FROM_ENV
    if not path.is_file():
        if path.exists():
            raise ConfigError(f"the config file {path} is not a file")
        if profile is not None:
            raise ConfigError(f"no profile {profile!r}: there is no config file {path} "
                              "(docs/cli.md says how to write one)")
        return Settings(path, False, None, None)
    data = _read_toml(path)
    unknown_sections = sorted(set(data) - {"default", "profile"})
    if unknown_sections:
        raise ConfigError(f"{path}: unknown section [{unknown_sections[0]}] (known: [default], [profile.NAME])")
    defaults = _section(path, "default", data.get("default", {}))
    profiles = data.get("profile", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: 'profile' must be tables [profile.NAME], not a value")
    checked = {name: _section(path, f"profile.{name}", table) for name, table in profiles.items()}
    if profile is not None and profile not in checked:
        known = ", ".join(sorted(checked)) or "none"
        raise ConfigError(f"no profile {profile!r} in {path} (profiles: {known})")
    return Settings(path, True, profile, profile_source if profile is not None else None, defaults,
                    checked.get(profile, {}), tuple(sorted(checked)))


def _read_toml(path: Path) -> dict:
    if sys.version_info < (3, 11):
        raise ConfigError(f"the config file {path} needs Python 3.11 or later to be read (tomllib); "
                          "remove it, or use the flags and MPFLEET_* variables")
    import tomllib

    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}") from None


def _section(path: Path, name: str, table) -> dict:
    """One section's settings, each checked by its owner's parser; paths made absolute."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table of settings")
    checked = {}
    for key, value in table.items():
        if key not in ENV_VARS:
            raise ConfigError(f"{path}: unknown key {key!r} in [{name}] (known: {', '.join(ENV_VARS)})")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: [{name}] {key} must be a non-empty string, not {value!r}")
        checked[key] = _checked_value(path, name, key, value)
    return checked


def _checked_value(path: Path, section: str, key: str, value: str) -> str:
    if key in PATH_SETTINGS:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (path.parent / p))
    if key == "broker":
        from mpfleet.broker.link import BrokerUrlError, parse_broker_url

        try:
            parse_broker_url(value)
        except BrokerUrlError as e:
            raise ConfigError(f"{path}: [{section}] broker {value!r}: {e}") from None
    elif key == "topic_root":
        from mpfleet.protocol.topics import TopicRootError, check_topic_root

        try:
            check_topic_root(value)
        except TopicRootError as e:
            raise ConfigError(f"{path}: [{section}] topic_root {value!r}: {e}") from None
    return value


def remember(ctx: click.Context, settings: Settings) -> None:
    """Keep the settings the root command loaded for every option default below it."""
    ctx.find_root().meta[_META_KEY] = settings


def current() -> Settings:
    """The settings of the running command: the ones the root loaded (--profile), else
    loaded now from the file and $MPFLEET_PROFILE (a command invoked without the root)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return load_settings()
    root = ctx.find_root()
    if _META_KEY not in root.meta:
        root.meta[_META_KEY] = load_settings()
    return root.meta[_META_KEY]


def configured(key: str, built_in: str | None = None):
    """An option default: the value of `key` from the selected profile or [default], else
    `built_in` (None: the library's own default, which also honours $MPFLEET_HOME)."""

    def default():
        try:
            value, _ = current().lookup(key)
        except ConfigError:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.resilient_parsing:
                return built_in  # shell completion: a bad file completes from the built-in default
            raise
        return value if value is not None else built_in

    default.__name__ = f"configured_{key}"
    return default


def built_in_value(key: str) -> str:
    """What mpfleet uses when nothing names `key`."""
    if key == "db":
        from mpfleet.db.store import default_db_path

        return str(default_db_path())
    if key == "keys_dir":
        from mpfleet.fleet.keys import default_keys_dir

        return str(default_keys_dir())
    if key == "images_dir":
        from mpfleet.images.store import default_images_dir

        return str(default_images_dir())
    return {"broker": BUILT_IN_BROKER, "topic_root": BUILT_IN_TOPIC_ROOT}[key]


def effective(ctx: click.Context, key: str, given) -> tuple[str, str]:
    """The value of setting `key` in this command and where it came from (flag, env, profile,
    default, built-in); `given` is the option's value after click resolved it."""
    source = ctx.get_parameter_source(key)
    if source is click.core.ParameterSource.COMMANDLINE:
        return _text(given), FROM_FLAG
    if source is click.core.ParameterSource.ENVIRONMENT:
        return _text(given), FROM_ENV
    value, layer = current().lookup(key)
    if value is not None:
        return value, layer
    return built_in_value(key), FROM_BUILT_IN


def _text(value) -> str:
    from mpfleet.broker.link import BrokerConfig

    return value.url() if isinstance(value, BrokerConfig) else str(value)
