"""`mpfleet image ...`: the firmware image store for OTA (library: mpfleet.images.store)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from mpfleet.cli.options import DB, IMAGES_DIR, JSON, open_store
from mpfleet.cli.render import ago, print_json


console = Console()


def _images(db, images_dir, create: bool = False):
    """The database and image store; only `image add` makes a missing database."""
    from mpfleet.images.store import ImageStore

    store = open_store(db, create=create)
    return store, ImageStore(store, images_dir)



@click.group("image")
def image() -> None:
    """Firmware images and app bundles for updates, validated and kept by SHA-256.

    \b
      mpfleet image add micropython.bin        # an app image (.app-bin), checked with esptool's image code
      mpfleet image add firmware.bin           # a merged image: the app is taken from 0x10000
      mpfleet image add agent-0.2.0.mpfa       # an app bundle (mpfleet app bundle)
      mpfleet image list
      mpfleet image build --board virtual --version v1.25.0 -o test-v1.25.0.app-bin   # a test image
    """


@image.command("build")
@click.option("--board", default="virtual", show_default=True, help="Board definition name or .json path.")
@click.option("--version", "version", required=True, help="Version written into the image, e.g. v1.25.0.")
@click.option("--secure-version", type=click.IntRange(min=0, max=0xFFFFFFFF), default=0, show_default=True,
              help="esp_app_desc_t's secure_version (anti-rollback).")
@click.option("--size", type=click.IntRange(min=4096), help="Image size in bytes, about (default about 4 KiB).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="Where to write the image.")
def image_build(board, version, secure_version, size, output):
    """Write a test firmware image for a board: a valid ESP app image (header, chip id,
    esp_app_desc_t) that virtual boards boot and `image add` accepts. It holds no
    MicroPython: it is for trying updates (docs/ota.md) on virtual boards."""
    from mpfleet.boards import load_board
    from mpfleet.errors import MpfleetError
    from mpfleet.images.espimage import build_app_image

    if len(version.encode()) > 31:
        raise click.BadParameter(f"{version!r} is longer than the image's 31-byte version field",
                                 param_hint="--version")
    definition = load_board(board)
    data = build_app_image(definition.chip, version, secure_version=secure_version, size=size)
    try:
        with open(output, "wb") as f:
            f.write(data)
    except OSError as e:
        raise MpfleetError(f"cannot write {output}: {e.strerror or e}") from None
    console.print(f"wrote {output}: {definition.chip} image {version}, secure_version {secure_version}, "
                  f"{len(data)} bytes", highlight=False)


@image.command("add")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--chip", help="Refuse the image unless it is for this chip (esp32, esp32s3, esp32c3...).")
@DB
@IMAGES_DIR
@JSON
def image_add(file, chip, db, images_dir, as_json):
    """Check FILE (app image, merged flash image or app bundle) and add it to the store."""
    from mpfleet.images.appbundle import is_bundle_file
    from mpfleet.images.store import check_image_file

    bundle = is_bundle_file(file)
    # Refused before the store is opened: a refused image leaves no file, no record, no database.
    if bundle and chip:
        raise click.UsageError(f"{file} is an app bundle: --chip is for firmware images")
    if not bundle:
        check_image_file(file, chip)
    store, images = _images(db, images_dir, create=True)
    with store:
        if bundle:
            record, new = images.add_bundle(file)
        else:
            record, new = images.add(file, chip=chip)
    if as_json:
        print_json(dict(record.to_json(), new=new))
        return
    verb = "added" if new else "already in the store:"
    console.print(f"{verb} image [bold]{record.id}[/] ({record.kind}): {record.project} {record.version} for "
                  f"{record.chip}, secure_version {record.secure_version}, {record.size} bytes, "
                  f"SHA-256 {record.sha256}", highlight=False)


@image.command("list")
@DB
@IMAGES_DIR
@JSON
def image_list(db, images_dir, as_json):
    """The images in the store, oldest first."""
    store, images = _images(db, images_dir)
    with store:
        records = images.list()
    if as_json:
        print_json([r.to_json() for r in records])
        return
    if not records:
        console.print("no images yet: mpfleet image add FILE")
        return
    table = Table(title="images")
    for col in ("id", "chip", "version", "secure", "size", "from", "added"):
        table.add_column(col, no_wrap=col == "id")
    for r in records:
        table.add_row(r.id, r.chip, r.version, str(r.secure_version), str(r.size), r.kind, ago(r.added))
    console.print(table)


@image.command("show")
@click.argument("ref", metavar="ID")
@DB
@IMAGES_DIR
@JSON
def image_show(ref, db, images_dir, as_json):
    """One image (by id or a unique prefix of it)."""
    store, images = _images(db, images_dir)
    with store:
        record = images.get(ref)
    if as_json:
        print_json(record.to_json())
        return
    for key, value in record.to_json().items():
        console.print(f"{key:15s} {value}", highlight=False)
