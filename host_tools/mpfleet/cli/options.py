"""Options and parameter types shared by the `mpfleet` command modules.

Input is checked here, at the boundary: a parameter type converts the text with the
library's own parser (device ids: mpfleet.protocol.ids, durations and times:
mpfleet.protocol.times, queries: mpfleet.fleet.registry) and fails with click's
BadParameter quoting the offending value, so a command body gets values it can trust.
Output helpers are in `mpfleet.cli.render`.
"""

from __future__ import annotations

from pathlib import Path

import click

from mpfleet.cli.settings import BUILT_IN_BROKER, BUILT_IN_TOPIC_ROOT, configured
from mpfleet.errors import MpfleetError
from mpfleet.protocol.ids import DEVICE_ID_RULE, is_device_id
from mpfleet.protocol.times import TimeFormatError, parse_duration, parse_time

# Each setting's default is the config file's (cli/settings.py: the selected profile, then
# [default]); click puts the flag and then its environment variable above it.
DB = click.option("--db", type=click.Path(dir_okay=False), envvar="MPFLEET_DB", default=configured("db"),
                  show_default="~/.mpfleet/mpfleet.db",
                  help="The database: a SQLite file, or a PostgreSQL URL postgresql://user@host/name "
                       "for several serve workers (env MPFLEET_DB, config key db).")
KEYS_DIR = click.option("--keys-dir", type=click.Path(file_okay=False), envvar="MPFLEET_KEYS",
                        default=configured("keys_dir"), show_default="~/.mpfleet/keys",
                        help="Private key directory (env MPFLEET_KEYS, config key keys_dir).")
IMAGES_DIR = click.option("--images-dir", type=click.Path(file_okay=False), envvar="MPFLEET_IMAGES",
                          default=configured("images_dir"), show_default="~/.mpfleet/images",
                          help="Image store: firmware images and app bundles (env MPFLEET_IMAGES, "
                               "config key images_dir).")


class NoDatabaseError(MpfleetError):
    """The database a command should read does not exist (a mistyped --db, MPFLEET_DB or profile)."""


def database_path(db: str | None) -> Path | str:
    """The database a command's --db names: the option's value (a file's Path, or a
    PostgreSQL URL as given), else the library's default."""
    from mpfleet.db.backend import normalized
    from mpfleet.db.store import default_db_path

    return normalized(db) if db else default_db_path()


def open_store(db: str | None, *, create: bool = False):
    """The Store of the database `db` names (cli boundary for mpfleet.db.store.Store).

    Only a command that registers something (keys init, devices add, sim fleet...) passes
    `create=True`: any other command refuses a missing file instead of leaving an empty
    database wherever a mistyped --db pointed."""
    from mpfleet.db.backend import is_url
    from mpfleet.db.store import Store

    path = database_path(db)
    if is_url(path):
        return Store(path)  # a server's database: made by its operator (createdb), migrated on open
    if path.is_dir():
        raise NoDatabaseError(f"{path} is a directory, not a database file (--db names the file)")
    if not create and not path.exists():
        raise NoDatabaseError(f"no database at {path} (check --db, MPFLEET_DB or the config file's db: "
                              "`mpfleet config show` says which is used; `mpfleet keys init` or "
                              "`mpfleet devices add` make a new one)")
    return Store(path)


JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


class BrokerUrl(click.ParamType):
    """A broker URL (mpfleet.broker.link.parse_broker_url), converted to its BrokerConfig."""

    name = "url"

    def convert(self, value, param, ctx):
        from mpfleet.broker.link import BrokerConfig, BrokerUrlError, parse_broker_url

        if isinstance(value, BrokerConfig):
            return value
        try:
            return parse_broker_url(value)
        except BrokerUrlError as e:
            self.fail(str(e), param, ctx)


def broker_option(help: str = "The broker", name: str = "broker"):
    """--broker URL, checked and converted to a BrokerConfig; env MPFLEET_BROKER."""
    return click.option("--broker", name, type=BrokerUrl(), envvar="MPFLEET_BROKER",
                        default=configured("broker", BUILT_IN_BROKER), show_default=BUILT_IN_BROKER,
                        help=f"{help}: mqtt://[user:pass@]host[:port], or mqtts://...?ca=ca.pem "
                             "for TLS (env MPFLEET_BROKER, config key broker).")


BROKER = broker_option()


class TopicRoot(click.ParamType):
    """A topic root (mpfleet.protocol.topics.check_topic_root): where a fleet's topics live."""

    name = "root"

    def convert(self, value, param, ctx):
        from mpfleet.protocol.topics import TopicRootError, check_topic_root

        try:
            return check_topic_root(value)
        except TopicRootError as e:
            self.fail(str(e), param, ctx)


TOPIC_ROOT = click.option("--topic-root", type=TopicRoot(), envvar="MPFLEET_TOPIC_ROOT",
                          default=configured("topic_root", BUILT_IN_TOPIC_ROOT), show_default=BUILT_IN_TOPIC_ROOT,
                          help="Where this fleet's topics live on the broker: <root>/<device-id>/<leaf> "
                               "(env MPFLEET_TOPIC_ROOT, config key topic_root). Two fleets on one broker use "
                               "two roots.")


def completion_rows(ctx: click.Context, query: str) -> list[tuple]:
    """The rows of `query` in the database this command line names, for shell completion:
    --db as typed so far, else $MPFLEET_DB, the config file's db (for --profile as typed,
    else $MPFLEET_PROFILE), else the default. Opened read-only, so completion never
    creates or changes a database; any failure completes nothing."""
    import os
    import sqlite3

    from mpfleet.cli.settings import load_settings
    from mpfleet.db import backend

    db = ctx.params.get("db") or os.environ.get("MPFLEET_DB")
    if not db:
        try:
            db = load_settings(ctx.find_root().params.get("profile")).lookup("db")[0]
        except MpfleetError:
            return []
    path = database_path(db)
    if backend.is_url(path):
        try:
            connection = backend.PgConnection(str(path), connect_timeout=1)
            try:
                connection.execute("SET default_transaction_read_only = on")
                return connection.execute(query).fetchall()
            finally:
                connection.close()
        except (backend.BackendError, *backend.storage_errors()):
            return []
    if not path.is_file():
        return []
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return connection.execute(query).fetchall()
        finally:
            connection.close()
    except sqlite3.Error:
        return []


class DeviceId(click.ParamType):
    """A device id: 1..64 of a-z, 0-9, _ and - (docs/protocol.md). Completes the
    registry's device ids."""

    name = "device id"

    def convert(self, value, param, ctx):
        if not is_device_id(value):
            self.fail(f"{value!r} is not a valid {self.name} ({DEVICE_ID_RULE})", param, ctx)
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        rows = completion_rows(ctx, "SELECT id, board FROM devices ORDER BY id LIMIT 5000")
        return [CompletionItem(device, help=board or None) for device, board in rows if device.startswith(incomplete)]


class GroupName(DeviceId):
    """A group name: the device id rule, so groups travel in topics and config files unquoted.
    Completes the groups the registry's devices are in."""

    name = "group name"

    def shell_complete(self, ctx, param, incomplete):
        import json

        from click.shell_completion import CompletionItem

        counts: dict[str, int] = {}
        for (groups_json,) in completion_rows(ctx, "SELECT groups_json FROM devices"):
            try:
                groups = json.loads(groups_json)
            except ValueError:
                continue
            for group in groups if isinstance(groups, list) else ():
                if isinstance(group, str):
                    counts[group] = counts.get(group, 0) + 1
        return [CompletionItem(group, help=f"{n} device(s)") for group, n in sorted(counts.items())
                if group.startswith(incomplete)]


class Query(click.ParamType):
    """A registry query (fw<v1.25.0,backlog>100), compiled to a predicate on device records."""

    name = "query"

    def convert(self, value, param, ctx):
        from mpfleet.fleet.registry import QueryError, parse_query

        if callable(value):
            return value
        try:
            return parse_query(value)
        except QueryError as e:
            self.fail(str(e), param, ctx)


class Duration(click.ParamType):
    """A duration more than zero, in seconds: 90, 90s, 10m, 1.5h, 2d, 1w (mpfleet.protocol.times)."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            seconds = parse_duration(value)
        except TimeFormatError as e:
            self.fail(str(e), param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r} is not a duration more than zero, such as 90s, 10m, 2h or 7d", param, ctx)
        return seconds


class PointInTime(click.ParamType):
    """A moment, in seconds since 1970: +10m (from now), 90m (ago), Unix seconds or ISO 8601
    (mpfleet.protocol.times)."""

    name = "time"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_time(value)
        except TimeFormatError as e:
            self.fail(str(e), param, ctx)


DEVICE_ID = DeviceId()
GROUP = GroupName()
DURATION = Duration()
POINT_IN_TIME = PointInTime()
