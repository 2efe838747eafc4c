"""`mpfleet app ...`: app bundles, the agent's own code for app updates (library: mpfleet.images.appbundle)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from mpfleet.cli.options import JSON
from mpfleet.cli.render import print_json

console = Console()


@click.group("app")
def app() -> None:
    """App bundles: the agent's lib/ compiled with mpy-cross, with a per-file SHA-256 manifest.

    \b
      mpfleet app bundle --version 0.4.0 -o agent-0.4.0.mpfa
      mpfleet app inspect agent-0.4.0.mpfa
    """


@app.command("bundle")
@click.option("--version", "app_version", required=True, help="The app version the bundle installs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Bundle file to write.")
@click.option("--firmware-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Firmware tree whose lib/ is bundled (default: this checkout's firmware/).")
@JSON
def app_bundle(app_version, output, firmware_dir, as_json):
    """Compile the agent's lib/ and write an app bundle."""
    from mpfleet.images.appbundle import write_bundle
    from mpfleet.images.firmware import FIRMWARE_DIR

    bundle = write_bundle(app_version, output, firmware_dir or FIRMWARE_DIR)
    summary = {"path": str(output), "version": app_version, "size": bundle.size, "sha256": bundle.sha256,
               "files": len(bundle.files), "mpy": bundle.manifest["mpy"]}
    if as_json:
        print_json(summary)
        return
    console.print(f"wrote {output}: app {app_version}, {len(bundle.files)} files, {bundle.size} bytes, "
                  f".mpy v{summary['mpy']['version']}.{summary['mpy']['sub']}, SHA-256 {bundle.sha256}",
                  highlight=False)


@app.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@JSON
def app_inspect(file, as_json):
    """Check a bundle (every file's size and SHA-256) and show its manifest."""
    from mpfleet.images.appbundle import read_bundle

    try:
        data = file.read_bytes()
    except OSError as e:
        raise click.FileError(str(file), e.strerror) from None
    bundle = read_bundle(data)
    if as_json:
        print_json({"manifest": bundle.manifest, "sha256": bundle.sha256, "size": bundle.size})
        return
    m = bundle.manifest
    console.print(f"app {m['version']}: {len(m['files'])} files, {bundle.size} bytes, "
                  f".mpy v{m['mpy']['version']}.{m['mpy']['sub']}, SHA-256 {bundle.sha256} (all files check out)",
                  highlight=False)
    for f in m["files"]:
        console.print(f"  {f['path']:40s} {f['size']:7d}  {f['sha256'][:16]}", highlight=False)
