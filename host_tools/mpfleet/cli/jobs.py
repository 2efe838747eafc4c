"""`mpfleet job ...`: create, watch, cancel and repair rollouts (library: mpfleet.fleet.rollout).

`job` commands work on the database directly; a running `serve` notices their
changes (SQLite's data_version) and updates the devices' queues.
"""

from __future__ import annotations

import json
import sys
import time

import click
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mpfleet.cli.options import DB, DEVICE_ID, DURATION, IMAGES_DIR, KEYS_DIR, JSON, POINT_IN_TIME, open_store
from mpfleet.cli.render import ago, print_json
from mpfleet.errors import MpfleetError
from mpfleet.fleet.registry import split_names
from mpfleet.fleet.jobs_model import (OUTCOME_EXIT, RATE_MAX_PER_MIN, Devices, ExecutionRow, JobStatus, RolloutOptions,
                                     stage_text)


console = Console()

# `mpfleet job status` exit codes (docs/dispatch.md; jobs_model.OUTCOME_EXIT): 0 every
# target SUCCEEDED, 1 an error (an unknown job...), 2 bad usage (click), then:
EXIT_ENDED = OUTCOME_EXIT["canceled"]      # 3: the job is ABORTED or CANCELED
EXIT_STUCK = OUTCOME_EXIT["stuck"]         # 4: ACTIVE, at least one execution flagged stuck
EXIT_FAILURES = OUTCOME_EXIT["failures"]   # 5: COMPLETED, some target did not succeed (or there was none)
EXIT_RUNNING = OUTCOME_EXIT["running"]     # 6: ACTIVE, still running, nothing stuck
QUERY_CHARS = "<>=!~ "                     # in a --targets name: a query typed into the wrong option


class JobId(click.ParamType):
    """A job id; its shell completion lists the database's job ids (read-only: a missing
    database completes nothing and is never created)."""

    name = "job"

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        from mpfleet.cli.options import completion_rows

        rows = completion_rows(ctx, "SELECT id, type, status FROM jobs ORDER BY created DESC LIMIT 1000")
        rows = [r for r in rows if r[0].startswith(incomplete)]
        return [CompletionItem(r[0], help=f"{r[1]} {r[2]}") for r in rows]


JOB_ID = JobId()


STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "REJECTED": "red", "TIMED_OUT": "red",
               "IN_PROGRESS": "cyan", "QUEUED": "yellow", "CANCELED": "magenta", "REMOVED": "magenta",
               "ACTIVE": "cyan", "COMPLETED": "green", "ABORTED": "red"}



def _engine(db: str | None, keys_dir: str | None):
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine

    store = open_store(db)  # a job needs devices: a missing database is a mistyped --db
    return store, RolloutEngine(store, KeyRing(store, keys_dir), Registry(store))


# ---------------------------------------------------------------- option parsing
def parse_fraction(text: str, what: str) -> float:
    """'5%' or '0.05' -> 0.05."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a percentage (5%) or a fraction (0.05)", param_hint=what) from None
    if not t.endswith("%") and value > 1:
        raise click.BadParameter(f"{text!r}: write percentages with % (e.g. {t}%), fractions as 0..1",
                                 param_hint=what)
    return value


def parse_stages(text: str) -> list:
    """--stages: cumulative stage sizes, comma separated; a bare integer is a number of
    devices (`1`: one canary device), `N%` a share of the targets; the last must be 100%.
    `1,10%,100%` -> [Devices(1), 0.1, 1.0]."""
    out: list = []
    for raw in text.split(","):
        t = raw.strip()
        if t.endswith("%"):
            try:
                pct = float(t[:-1])
            except ValueError:
                pct = None
            if pct is None or pct != pct or pct in (float("inf"), float("-inf")):
                raise click.BadParameter(f"{raw!r} is not a percentage such as 10%", param_hint="--stages")
            if not 0 < pct <= 100:
                raise click.BadParameter(f"{raw!r}: a stage's share must be more than 0% and at most 100%",
                                         param_hint="--stages")
            out.append(pct / 100)
            continue
        try:
            n = int(t)
        except ValueError:
            hint = f" (write a share as {float(t) * 100:g}%)" if _is_decimal(t) else ""
            raise click.BadParameter(f"{raw!r} is not a device count (1, 5) or a share (10%){hint}",
                                     param_hint="--stages") from None
        if n < 1:
            raise click.BadParameter(f"{raw!r}: a stage covers at least 1 device", param_hint="--stages")
        out.append(Devices(n))
    return out


def _is_decimal(t: str) -> bool:
    try:
        return 0 < float(t) <= 1
    except ValueError:
        return False


def parse_params(params: str | None, sets: tuple[str, ...], unsets: tuple[str, ...]) -> dict:
    """--params JSON (or @file.json), plus config shorthands --set KEY=VALUE and --unset KEY."""
    out: dict = {}
    if params:
        text = params
        if params.startswith("@"):
            try:
                with open(params[1:]) as f:
                    text = f.read()
            except OSError as e:
                raise click.BadParameter(f"cannot read {params[1:]}: {e.strerror}", param_hint="--params") from None
        try:
            out = json.loads(text)
        except ValueError as e:
            raise click.BadParameter(f"not JSON: {e}", param_hint="--params") from None
        if not isinstance(out, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--params")
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw  # a bare word is a string
        out.setdefault("set", {})[key] = value
    if unsets:
        out.setdefault("unset", []).extend(unsets)
    return out


def parse_targets(targets: tuple[str, ...], query: str | None, all_devices: bool):
    names = split_names(targets)
    for name in names:
        if any(c in name for c in QUERY_CHARS):
            raise click.BadParameter(f"{name!r} is not a device id or group name; it looks like a query: "
                                     f"--query {name!r}", param_hint="--targets")
    if all_devices:
        names.append("*")
    if not names and not query:
        raise click.UsageError("say which devices: --targets ID|GROUP[,...], --query '...' or --all")
    if query is None:
        return names
    spec: dict = {"query": query}
    if "*" in names:
        spec["all"] = True
    names = [n for n in names if n != "*"]
    if names:
        spec["names"] = names
    return spec


def _split_names(engine, spec):
    """Turn the CLI's names (ids or groups) into the engine's dict form."""
    if isinstance(spec, dict) and "names" in spec:
        spec["ids"], spec["groups"] = engine.registry.split_ids_and_groups(spec.pop("names"))
    return spec


# ---------------------------------------------------------------- rendering
def _stage_text(s: JobStatus) -> str:
    stage = min(s.stage, len(s.stages) - 1)
    return f"{stage + 1}/{len(s.stages)} ({stage_text(s.stages[stage])}, {s.stage_size} devices)"


def _failure_reason(row: ExecutionRow) -> str:
    detail = row.detail
    if isinstance(detail, dict):
        for key in ("error", "reason", "problems"):
            if detail.get(key):
                return str(detail[key])
    if detail:
        return str(detail)
    return row.note or ""


def _progress_text(row: ExecutionRow) -> str:
    p = row.progress
    if row.status == "SUCCEEDED":
        return "done"
    if not isinstance(p, dict) or not p.get("total"):
        return ""
    return f"{p['bytes'] / p['total']:.0%} ({p['bytes'] // 1024} of {p['total'] // 1024} KiB)"


KEY_COLUMNS = ("id", "device", "status")  # never cut at 80 columns: ids are what the operator types next


def _columns(table: Table, cols, rows_of: dict[str, list[str]] | None = None) -> None:
    """Add `cols` to `table`: key columns (KEY_COLUMNS) neither wrap nor shrink below
    their longest value (`rows_of[col]`); the others fold."""
    for col in cols:
        if col in KEY_COLUMNS:
            longest = max((len(v) for v in (rows_of or {}).get(col, [])), default=len(col))
            table.add_column(col, no_wrap=True, min_width=max(longest, len(col)))
        else:
            table.add_column(col, overflow="fold")


RESULT_TYPES = ("diag", "upload", "sample")  # jobs whose SUCCEEDED detail is the result the operator asked for


def _result_text(detail) -> str:
    """A device's result readably: `key=value` pairs (nested objects as JSON)."""
    if isinstance(detail, dict):
        return ", ".join(f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v)}" for k, v in detail.items())
    return "" if detail is None else str(detail)


def _results_table(s: JobStatus) -> Table | None:
    done = [r for r in _latest_rows(s) if r.status == "SUCCEEDED"]
    if s.type not in RESULT_TYPES or not done:
        return None
    table = Table(title=f"results ({s.type})", title_justify="left")
    _columns(table, ("device", "result"), {"device": [r.device for r in done[:30]]})
    for row in done[:30]:
        table.add_row(row.device, _result_text(row.detail))
    if len(done) > 30:
        table.caption = f"... {len(done) - 30} more (--json shows all)"
    return table


def _update_table(s: JobStatus) -> Table:
    """Per device: state, download progress, and the version it reports running."""
    latest: dict[str, ExecutionRow] = {}
    for row in s.devices:
        latest[row.device] = row  # ordered by attempt: the last one wins
    want = s.params.get("version")
    table = Table(title=f"devices (target version {want})", title_justify="left")
    shown = list(latest.values())[:30]
    _columns(table, ("device", "status", "progress", "running"),
             {"device": [r.device for r in shown], "status": [r.status for r in shown]})
    for row in shown:
        running = row.running or ""
        table.add_row(row.device, Text(row.status, style=STATE_STYLE.get(row.status, "")),
                      _progress_text(row), Text(running, style="green" if running == want else ""))
    if len(latest) > 30:
        table.caption = f"... {len(latest) - 30} more (--json shows all)"
    return table


OUTCOME_STYLE = {"succeeded": "green", "failures": "red", "empty": "red", "aborted": "red", "canceled": "magenta",
                 "stuck": "red", "running": "cyan"}


def status_view(s: JobStatus, idle: str | None = None) -> Group:
    """What `job status` shows; `idle`: the hint that no dispatcher is running."""
    head = Text()
    head.append(f"job {s.id}  ", style="bold")
    head.append(s.status, style=STATE_STYLE.get(s.status, ""))
    if s.status != "ACTIVE":
        head.append(f": {s.outcome_text}", style=OUTCOME_STYLE.get(s.outcome, ""))
    head.append(f"  type {s.type}  stage {_stage_text(s)}  targets {s.target_count} "
                f"(not started {s.not_started})")
    if s.reason:
        head.append(f"\n{s.reason}", style="red" if s.status == "ABORTED" else "")
    if idle and s.status == "ACTIVE":
        head.append(f"\n{idle}", style="yellow")
    counts = Table(box=None, show_header=True, pad_edge=False)
    shown = [k for k, v in s.counts.items() if v or k in ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED")]
    for k in shown:
        counts.add_column(k, justify="right", style=STATE_STYLE.get(k, ""))
    counts.add_row(*(str(s.counts[k]) for k in shown))
    parts = [head, counts]
    if s.failures:
        fails = Table(title="failures", title_justify="left")
        _columns(fails, ("device", "attempt", "status", "reason"),
                 {"device": [r.device for r in s.failures[:20]], "status": [r.status for r in s.failures[:20]]})
        for row in s.failures[:20]:
            fails.add_row(row.device, str(row.attempt), row.status, _failure_reason(row)[:100])
        if len(s.failures) > 20:
            fails.caption = f"... {len(s.failures) - 20} more (--json shows all)"
        parts.append(fails)
    if s.type in ("ota", "app") and s.devices:
        parts.append(_update_table(s))
    results = _results_table(s)
    if results is not None:
        parts.append(results)
    canceled = [r for r in _latest_rows(s) if r.note and "canceled while in progress" in r.note]
    if canceled:
        notes = Table(title="canceled while running", title_justify="left")
        _columns(notes, ("device", "status", "what happened"),
                 {"device": [r.device for r in canceled[:20]], "status": [r.status for r in canceled[:20]]})
        for row in canceled[:20]:
            notes.add_row(row.device, Text(row.status, style=STATE_STYLE.get(row.status, "")),
                          row.note.split("; then: ", 1)[1] if "; then: " in row.note
                          else "told to stop; not reported since (it may still finish)")
        parts.append(notes)
    if s.stuck:
        stuck = Table(title=f"stuck: {len(s.stuck)} execution(s) not taken "
                            f"(mpfleet job retry|remove {s.id} --device ID)", title_justify="left",
                      title_style="red")
        _columns(stuck, ("device", "attempt", "queued", "reason"), {"device": [f.device for f in s.stuck[:20]]})
        for flag in s.stuck[:20]:
            stuck.add_row(flag.device, str(flag.attempt), ago(flag.queued), flag.reason)
        if len(s.stuck) > 20:
            stuck.caption = f"... {len(s.stuck) - 20} more (--json shows all)"
        parts.append(stuck)
    if s.held:
        first = s.held[0]
        parts.append(Text(f"{len(s.held)} device(s) wait for an earlier job of type {s.type} to reach them "
                          f"first (jobs of one type run in creation order): {first.device} waits for "
                          f"{first.behind}", style="yellow"))
    if s.unattributed_rejects:
        parts.append(Text(f"{len(s.unattributed_rejects)} envelope(s) rejected before their job could be "
                          f"named (bad signature, unknown key): see --json", style="yellow"))
    return Group(*parts)


# ---------------------------------------------------------------- commands
@click.group("job")
def job() -> None:
    """Batch jobs: create a signed rollout, watch it, cancel it.

    \b
      mpfleet job create config --set sample_interval_s=30 --targets pumps \\
          --stages 5%,25%,100% --success-threshold 95% --abort-threshold 10% --rate 600
      mpfleet job list
      mpfleet job status j-1a2b3c --watch
      mpfleet job retry j-1a2b3c --device pump-07
      mpfleet job remove j-1a2b3c --device pump-09
      mpfleet job cancel j-1a2b3c

    `mpfleet serve` delivers what these commands record.
    """


@job.command("create")
@click.argument("type_", metavar="TYPE")
@click.option("--params", help="Job params as JSON, or @file.json.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="config jobs: set a dotted key (VALUE is JSON, else text). Repeatable.")
@click.option("--unset", "unsets", multiple=True, metavar="KEY", help="config jobs: remove a dotted key. Repeatable.")
@click.option("--targets", multiple=True, metavar="IDS|GROUPS",
              help="Device ids and/or group names, comma separated. Repeatable. Each must select a device "
                   "(see --allow-empty); a filter such as 'fw<v1.25' goes in --query.")
@click.option("--query", help="Only devices whose reported state matches, e.g. 'fw<v1.25.0,group=pumps'.")
@click.option("--all", "all_devices", is_flag=True, help="Every registered device.")
@click.option("--id", "job_id", help="Job id (default: j-<random>).")
@click.option("--rate", type=click.IntRange(1, RATE_MAX_PER_MIN),
              help=f"At most this many devices started per minute (1..{RATE_MAX_PER_MIN:,}).")
@click.option("--stages", help="Cumulative stage sizes: a bare integer is a number of devices, N% a share of the "
                               "targets, ending at 100%; e.g. 1,10%,100% (one canary, then 10%, then all). "
                               "Default: one stage.")
@click.option("--success-threshold", help="A stage must reach this success rate to advance (default 100%).")
@click.option("--abort-threshold", help="Abort when this share of finished executions failed, e.g. 20%.")
@click.option("--abort-min", type=click.IntRange(min=1), help="...counted only after this many finished (default 1).")
@click.option("--timeout", type=DURATION, help="A device in progress longer than this is TIMED_OUT (e.g. 10m).")
@click.option("--queued-timeout", type=DURATION,
              help="A device that has not taken the job this long after it was queued is "
                   "flagged stuck in `job status` (default 2h; keep it above a few of the "
                   "devices' connect intervals, sample_interval_s x upload_every_wakes).")
@click.option("--retries", type=click.IntRange(0, 100), help="Retries of FAILED or TIMED_OUT executions (default 0).")
@click.option("--start", "start_at", type=POINT_IN_TIME, help="Not before: +10m, an ISO time or Unix seconds.")
@click.option("--end", "end_at", type=POINT_IN_TIME,
              help="Stop starting devices after: +2h, an ISO time or Unix seconds.")
@click.option("--continuous", is_flag=True, help="Devices that join the targets later get the job too.")
@click.option("--allow-empty", is_flag=True,
              help="With --continuous or --start: accept targets that select no device yet (a group that devices "
                   "join later). Without it, a name or query that matches nothing is refused.")
@click.option("--image", "image_ref", metavar="ID",
              help="ota jobs: the firmware image (id from `mpfleet image list`, or a file to add).")
@click.option("--bundle", "bundle_ref", metavar="ID",
              help="app jobs: the app bundle (id from `mpfleet image list`, or a .mpfa file to add).")
@click.option("--allow-downgrade", is_flag=True, help="ota jobs: accept a lower secure_version (anti-rollback).")
@click.option("--chunk", type=int, default=4096, show_default=True, help="ota/app jobs: bytes per chunk.")
@click.option("--window", type=int, default=8, show_default=True, help="ota/app jobs: chunks in flight.")
@DB
@KEYS_DIR
@IMAGES_DIR
@JSON
def job_create(type_, params, sets, unsets, targets, query, all_devices, job_id, rate, stages, success_threshold,
               abort_threshold, abort_min, timeout, queued_timeout, retries, start_at, end_at, continuous, allow_empty,
               image_ref, bundle_ref, allow_downgrade, chunk, window, db, keys_dir, images_dir, as_json):
    """Record a rollout of a TYPE job (config, reboot, upload, diag, sample, exec, ota, app, keys).

    \b
      mpfleet job create ota --image 3f2a9c01b7e4 --targets pumps --stages 1,10%,100% --timeout 30m
      mpfleet job create app --bundle agent-0.2.0.mpfa --all --stages 5%,100%

    Nothing is signed or sent here: `mpfleet serve` signs one envelope per device as
    the rollout reaches it (stage, rate), so each retry gets a fresh seq. Refused here:
    a job whose signed envelope would be larger than a target device takes (its
    limits.job_max_bytes, 4096 unless it reports otherwise), and a config job that
    touches trusted_keys (use `mpfleet keys rotate`) or exec_allowed (USB only).

    Jobs of one type (config, keys, ota, app, exec) run on a device in the order they
    were created (or start, with --start): a device in a later stage of an earlier job
    of the type gets this one only after that one.

    Also refused: targets that select no device (a mistyped group, a query that matches
    nothing) unless --allow-empty with --continuous or --start; a --targets name that is
    a query ('fw<v1.25': use --query); stages that shrink once resolved (5,10% of 20
    devices is 5, then 2); an --end already past (+2h is two hours from now, 2h two
    hours ago); a config value the device's schema refuses (--set
    sample_interval_s=fast)."""
    if allow_empty and not (continuous or start_at is not None):
        raise click.UsageError("--allow-empty is for a job that waits for devices: add --continuous (devices "
                               "that join later get it) or --start (targets are resolved then)")
    if end_at is not None and end_at <= time.time():
        raise click.BadParameter(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(end_at))} is already past "
                                 f"(a time from now is written +2h)", param_hint="--end")
    options = {
        "rate_per_min": rate,
        "stages": parse_stages(stages) if stages else None,
        "success_threshold": parse_fraction(success_threshold, "--success-threshold") if success_threshold else None,
        "abort_threshold": parse_fraction(abort_threshold, "--abort-threshold") if abort_threshold else None,
        "abort_min_finished": abort_min,
        "timeout_s": timeout,
        "queued_timeout_s": queued_timeout,
        "retries": retries,
        "start_at": start_at,
        "end_at": end_at,
        "continuous": continuous or None,
    }
    job_params = parse_params(params, sets, unsets)
    if type_ == "config":
        from mpfleet.fleet.configschema import check_config_values

        check_config_values(job_params)
    spec = parse_targets(targets, query, all_devices)
    if (image_ref or allow_downgrade) and type_ != "ota":
        raise click.UsageError("--image and --allow-downgrade are for ota jobs")
    if bundle_ref and type_ != "app":
        raise click.UsageError("--bundle is for app jobs")
    if type_ == "ota" and not image_ref:
        raise click.UsageError("an ota job needs --image ID (see `mpfleet image list`)")
    if type_ == "app" and not bundle_ref:
        raise click.UsageError("an app job needs --bundle ID or FILE (build one: `mpfleet app bundle`)")
    store, engine = _engine(db, keys_dir)
    with store:
        engine.keyring.fleet_key()  # fail now, not in serve, when there is no key
        unmatched = engine.unmatched_targets(_split_names(engine, spec))
        if unmatched and not allow_empty:
            raise TargetsError(f"targets match no device: {'; '.join(unmatched)}"
                               + (" (a job waiting for devices to join: --continuous --allow-empty)"
                                  if not continuous else " (to wait for devices to join: --allow-empty)"))
        if type_ in ("ota", "app"):
            job_params.update(_update_params(store, engine, type_, image_ref or bundle_ref, allow_downgrade, chunk,
                                             window, images_dir, spec))
        new_id = engine.create_job(type_, job_params, _split_names(engine, spec), job_id=job_id,
                                   options=RolloutOptions.from_json(options))  # None: the default
        status = engine.job_status(new_id)
        idle = _no_dispatcher(store)
    if as_json:
        print_json(_status_json(status))
        return
    console.print(f"created job [bold]{new_id}[/] ({type_}); `mpfleet serve` rolls it out. "
                  f"Watch it: mpfleet job status {new_id} --watch", highlight=False)
    if idle:
        console.print(idle, style="yellow", highlight=False)


class TargetsError(MpfleetError):
    """`job create`'s targets select no device."""


def _no_dispatcher(store) -> str | None:
    """The hint that nothing will move, when no `mpfleet serve` heartbeats on this database."""
    from mpfleet.fleet.dispatchers import running

    if running(store):
        return None
    return f"no `mpfleet serve` is running on {store.shown}; nothing will move until one runs (mpfleet serve)"


def _status_json(status: JobStatus) -> dict:
    """`--json` of a job: JobStatus.to_json() plus what it came to (outcome, exit code)."""
    return {**status.to_json(), "outcome": status.outcome, "succeeded_targets": status.succeeded_targets,
            "exit_code": OUTCOME_EXIT[status.outcome]}


def _update_params(store, engine, type_, ref, allow_downgrade, chunk, window, images_dir, spec) -> dict:
    """The signed params of an ota/app job; a file given instead of an id is added first."""
    import os

    from mpfleet.images.appbundle import is_bundle_file
    from mpfleet.images.store import ImageStore
    from mpfleet.fleet.updates import app_params, check_targets, ota_params

    images = ImageStore(store, images_dir)
    if os.path.isfile(ref):
        record, _ = images.add_bundle(ref) if is_bundle_file(ref) else images.add(ref)
        ref = record.id
    if type_ == "ota":
        params, record = ota_params(images, ref, allow_downgrade, chunk, window)
        check_targets(engine.registry, engine.resolve_targets(_split_names(engine, spec)), record)
        return params
    return app_params(images, ref, chunk, window)[0]


@job.command("list")
@click.option("--status", type=click.Choice(["ACTIVE", "COMPLETED", "ABORTED", "CANCELED"], case_sensitive=False))
@DB
@KEYS_DIR
@JSON
def job_list(status, db, keys_dir, as_json):
    """Jobs, newest last, with their counts per state."""
    store, engine = _engine(db, keys_dir)
    with store:
        rows = [engine.job_status(j) for j in engine.jobs(status.upper() if status else None)]
    if as_json:
        shown = ("id", "type", "status", "stage", "stages", "target_count", "counts", "created", "finished", "reason")
        print_json([{**{k: j[k] for k in shown}, "stuck": len(j["stuck"]), "outcome": r.outcome}
                    for r, j in ((r, r.to_json()) for r in rows)])
        return
    if not rows:
        console.print("no jobs yet: mpfleet job create --help")
        return
    table = Table(title="jobs", box=box.SIMPLE_HEAD, pad_edge=False)
    states = [_list_state(r) for r in rows]
    _columns(table, ("id", "type", "status", "stage", "ok/failed/pending", "stuck", "created"),
             {"id": [r.id for r in rows], "status": [t for t, _ in states]})
    for r, (state, style) in zip(rows, states):
        c = r.counts
        failed = c["FAILED"] + c["REJECTED"] + c["TIMED_OUT"]
        stage = min(r.stage, len(r.stages) - 1)
        table.add_row(r.id, r.type, Text(state, style=style), f"{stage + 1}/{len(r.stages)}",
                      f"{c['SUCCEEDED']}/{failed}/{c['QUEUED'] + c['IN_PROGRESS'] + r.not_started} "
                      f"of {r.target_count}",
                      Text(str(len(r.stuck)), style="red" if r.stuck else ""), ago(r.created))
    console.print(table)


def _list_state(r: JobStatus) -> tuple[str, str]:
    """A job's state in `job list`: a COMPLETED job where some target did not succeed
    reads `COMPLETED, failures` (or `COMPLETED, empty`), never as plain success."""
    if r.outcome in ("failures", "empty"):
        return f"{r.status}, {r.outcome}", "red"
    return r.status, STATE_STYLE.get(r.status, "")


@job.command("status")
@click.argument("job_id", metavar="JOB", type=JOB_ID)
@click.option("--watch", is_flag=True, help="Refresh until the job is no longer ACTIVE.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@DB
@KEYS_DIR
@JSON
def job_status(job_id, watch, interval, db, keys_dir, as_json):
    """Counts per state, the current stage, failures with their reasons, stuck executions.

    \b
      mpfleet job status j-1a2b3c
      mpfleet job status j-1a2b3c --watch && echo "rolled out everywhere"

    A COMPLETED job ran to its end; whether it succeeded is its outcome, shown beside
    it ("every target SUCCEEDED (5)", "3 of 5 targets did not succeed") and in the exit
    status. An execution is flagged stuck when it is QUEUED longer than the job's
    --queued-timeout (default 2h) or its envelope is over the limit its device reports;
    the flag changes nothing (a device that wakes late still takes the job): act with
    `mpfleet job retry` or `mpfleet job remove`. With no `mpfleet serve` running on
    the database, it says so: nothing moves without one.

    \b
    Exit status (with --watch: once the job is no longer ACTIVE):
      0  COMPLETED and every target SUCCEEDED
      1  an error (e.g. no such job)
      3  ABORTED or CANCELED
      4  ACTIVE, with at least one execution flagged stuck
      5  COMPLETED, but some target did not succeed (FAILED, REJECTED, TIMED_OUT,
         REMOVED, CANCELED, never reached) or there was no target
      6  ACTIVE, still running"""
    store, engine = _engine(db, keys_dir)
    with store:
        status = engine.job_status(job_id)
        idle = _no_dispatcher(store) if status.status == "ACTIVE" else None
        if watch and not as_json:
            if idle:
                console.print(idle, style="yellow", highlight=False)
            with Live(status_view(status, idle), console=console, refresh_per_second=4) as live:
                while status.status == "ACTIVE":
                    time.sleep(interval)
                    status = engine.job_status(job_id)
                    idle = _no_dispatcher(store)
                    live.update(status_view(status, idle))
        elif watch:
            if idle:
                print(f"mpfleet: {idle}", file=sys.stderr)
            while status.status == "ACTIVE":
                time.sleep(interval)
                status = engine.job_status(job_id)
    if as_json:
        print_json(_status_json(status))
    elif not watch:
        console.print(status_view(status, idle))
    sys.exit(status_exit_code(status))


def status_exit_code(status: JobStatus) -> int:
    """`job status`'s exit code for a job_status() record (jobs_model.OUTCOME_EXIT)."""
    return OUTCOME_EXIT[status.outcome]


@job.command("retry")
@click.argument("job_id", metavar="JOB", type=JOB_ID)
@click.option("--device", "devices", type=DEVICE_ID, multiple=True, metavar="ID",
              help="Retry on this device (repeatable). Default: every device whose latest execution FAILED, "
                   "was REJECTED or TIMED_OUT, or is stuck.")
@DB
@KEYS_DIR
@JSON
def job_retry(job_id, devices, db, keys_dir, as_json):
    """Sign a new attempt of JOB (a new envelope with a new seq) for its failed or stuck devices.

    \b
      mpfleet job retry j-1a2b3c                   # every FAILED, REJECTED, TIMED_OUT or stuck device
      mpfleet job retry j-1a2b3c --device pump-07

    --retries neither limits this nor retries it should it fail. A stuck QUEUED execution is replaced: it leaves the
    device's queue as REMOVED (a device that took it late is noted, and may run the job
    once more under the new seq). A COMPLETED job is ACTIVE again until the new attempts
    end. A later job of the same type still QUEUED on the device is signed again after
    the retry, so the device keeps creation order; refused when a later job of the type
    already ran there (the retry would undo it), for a device still running the job,
    one it SUCCEEDED on, one it is QUEUED on and not stuck, and for an ABORTED or
    CANCELED job. `mpfleet serve` sends the new envelopes."""
    store, engine = _engine(db, keys_dir)
    with store:
        changes = engine.retry(job_id, list(devices) or None)
        status = engine.job_status(job_id)
    if as_json:
        print_json({"job": job_id, "retried": [{"job": j, "device": d, "attempt": a} for j, d, a in changes.queued],
                    "replaced": [{"job": j, "device": d} for j, d in changes.removed], "status": status.to_json()})
        return
    mine = [(d, a) for j, d, a in changes.queued if j == job_id]
    others = [(j, d) for j, d, _ in changes.queued if j != job_id]
    console.print(f"job {job_id}: new attempt signed for {len(mine)} device(s)"
                  + (f" ({', '.join(f'{d} #{a}' for d, a in mine[:10])}{' ...' if len(mine) > 10 else ''})"
                     if mine else "")
                  + (f"; {len(others)} later job(s) signed again after it to keep their order" if others else ""),
                  highlight=False)


@job.command("remove")
@click.argument("job_id", metavar="JOB", type=JOB_ID)
@click.option("--device", "devices", type=DEVICE_ID, multiple=True, required=True, metavar="ID",
              help="Remove JOB's QUEUED execution on this device (repeatable).")
@DB
@KEYS_DIR
@JSON
def job_remove(job_id, devices, db, keys_dir, as_json):
    """Take JOB's QUEUED execution on a device away: it becomes REMOVED and leaves the device's queue.

    \b
      mpfleet job remove j-1a2b3c --device pump-09

    The rest of the rollout goes on: a removed device does not count toward its
    stage's --success-threshold, and no longer holds later jobs of the type. Refused
    for a device that has no QUEUED execution of JOB (IN_PROGRESS: wait for it, its
    --timeout, or `job cancel`); `mpfleet job retry JOB --device ID` sends it again."""
    store, engine = _engine(db, keys_dir)
    with store:
        changes = engine.remove(job_id, list(devices))
        status = engine.job_status(job_id)
    if as_json:
        print_json({"job": job_id, "removed": [d for _, d in changes.removed], "status": status.to_json()})
        return
    console.print(f"job {job_id}: removed from {len(changes.removed)} device(s): "
                  f"{', '.join(d for _, d in changes.removed)}", highlight=False)


@job.command("cancel")
@click.argument("job_id", metavar="JOB", type=JOB_ID)
@click.option("--device", "devices", type=DEVICE_ID, multiple=True, metavar="ID",
              help="Cancel JOB on this device only (repeatable); the rest of the rollout goes on.")
@DB
@KEYS_DIR
@JSON
def job_cancel(job_id, devices, db, keys_dir, as_json):
    """Cancel JOB (or, with --device, its execution on some devices).

    \b
      mpfleet job cancel j-1a2b3c
      mpfleet job cancel j-1a2b3c --device pump-07

    Devices that have not started it lose it from their queue: stopped. Devices running
    it get a signed `cancel` job, and an update's download is refused as canceled: a
    device still downloading (ota, app) stops before its point of no return (set_boot,
    the app slot switch) and reports that it stopped. One that is past it, or a job
    that cannot be stopped midway (config, reboot, ...), may still finish: if its
    device then reports SUCCEEDED, `job status` shows SUCCEEDED, noted that the cancel
    came too late. Refused for a device whose execution already ended (or that the job
    has not reached yet) and for a job that is not ACTIVE."""
    store, engine = _engine(db, keys_dir)
    with store:
        before = {r.device: r for r in _latest_rows(engine.job_status(job_id))}
        if devices:
            engine.cancel_devices(job_id, list(devices))
        else:
            engine.cancel(job_id, reason="canceled by the operator")
        stops = engine.cancel_envelopes(job_id)
        status = engine.job_status(job_id)
    summary = cancel_summary(status, before, list(devices) or None)
    if as_json:
        print_json({"job": job_id, **summary, "status": _status_json(status)})
        return
    what = f"job {job_id} on {len(devices)} device(s)" if devices else f"job {job_id}"
    parts = [f"{len(summary['stopped'])} stopped before they started"]
    if summary["stopping"]:
        parts.append(f"{len(summary['stopping'])} downloading, told to stop before switching")
    if summary["may_finish"]:
        parts.append(f"{len(summary['may_finish'])} already past the point of no return or not stoppable midway: "
                     f"they may still finish ({', '.join(summary['may_finish'][:5])}"
                     f"{' ...' if len(summary['may_finish']) > 5 else ''})")
    console.print(f"canceled {what}: " + "; ".join(parts)
                  + (f". Cancel jobs wait for {len(stops)} device(s) that were running it; "
                     f"`mpfleet job status {job_id}` shows what each reports" if stops else ""),
                  highlight=False)


def _latest_rows(status: JobStatus) -> list[ExecutionRow]:
    latest: dict[str, ExecutionRow] = {}
    for row in status.devices:
        latest[row.device] = row  # ordered by attempt: the last one wins
    return list(latest.values())


def cancel_summary(status: JobStatus, before: dict[str, ExecutionRow], devices: list[str] | None) -> dict:
    """What a cancel did, from the executions before it: {"stopped": never started,
    "stopping": updates still downloading (their chunks are refused), "may_finish":
    running past their point of no return (download complete) or a job type that
    cannot be stopped midway}, device ids each."""
    out: dict[str, list[str]] = {"stopped": [], "stopping": [], "may_finish": []}
    for d, row in sorted(before.items()):
        if devices is not None and d not in devices:
            continue
        if row.status == "QUEUED":
            out["stopped"].append(d)
        elif row.status == "IN_PROGRESS":
            p = row.progress if isinstance(row.progress, dict) else {}
            downloading = status.type in ("ota", "app") and not (p.get("total") and p.get("bytes", 0) >= p["total"])
            out["stopping" if downloading else "may_finish"].append(d)
    return out
