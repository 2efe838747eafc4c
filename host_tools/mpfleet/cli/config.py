"""`mpfleet config ...`: the effective settings and where each came from (cli/settings.py, docs/cli.md)."""

from __future__ import annotations

import click

from mpfleet.cli import settings as cli_settings
from mpfleet.cli.options import BROKER, DB, IMAGES_DIR, JSON, KEYS_DIR, TOPIC_ROOT
from mpfleet.cli.render import print_json


@click.group("config")
def config() -> None:
    """The config file and its profiles (docs/cli.md).

    \b
      mpfleet config show
      mpfleet --profile lab config show --json
    """


@config.command("show")
@DB
@KEYS_DIR
@IMAGES_DIR
@BROKER
@TOPIC_ROOT
@JSON
@click.pass_context
def config_show(ctx: click.Context, as_json: bool, **given) -> None:
    """Print every effective setting and where it came from: flag, env, profile, default
    (the config file's [default] section) or built-in. The flags are accepted so that
    `config show --db X` shows what a command given --db X would use."""
    from mpfleet.broker.link import parse_broker_url

    settings = cli_settings.current()
    rows = {}
    for key in cli_settings.ENV_VARS:
        value, source = cli_settings.effective(ctx, key, given[key])
        if key == "broker":
            value = parse_broker_url(value).url()  # never print a password
        rows[key] = {"value": value, "source": source}
    if as_json:
        print_json({"config_file": str(settings.path), "config_file_exists": settings.exists,
                    "profile": settings.profile, "profile_source": settings.profile_source,
                    "profiles": list(settings.profiles), "settings": rows})
        return
    click.echo(f"config file: {settings.path}{'' if settings.exists else ' (none)'}")
    if settings.profile:
        click.echo(f"profile: {settings.profile} (from {settings.profile_source})")
    for key, row in rows.items():
        where = {cli_settings.FROM_PROFILE: f"profile {settings.profile}",
                 cli_settings.FROM_ENV: f"env {cli_settings.ENV_VARS[key]}",
                 cli_settings.FROM_DEFAULT_SECTION: "[default]"}.get(row["source"], row["source"])
        click.echo(f"{key:<11} {row['value']}  ({where})")
