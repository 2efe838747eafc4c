"""The host's firmware image store: what `mpfleet image add` accepts and keeps for OTA.

Which room: host library (CLI: cli_images.py). An image is the app image alone (the
bytes an OTA writes into the free app slot), stored as `<images dir>/<sha256>.bin`
(default ~/.mpfleet/images, `$MPFLEET_IMAGES`) and described by a row of the `images`
table: chip, version, secure_version, project, size, SHA-256, and where it came from
(the table is created with every other one when the store opens: db/schema.py).

Accepted inputs (`add`):

- an app image (`.app-bin`, MicroPython's `micropython.bin`): magic 0xE9 with an
  `esp_app_desc_t`; a tail of 0xFF (a partition read back) is dropped, anything
  else after the image is refused as a mismatched file;
- a merged flash image (MicroPython's `firmware.bin`, esptool `merge-bin`): the app
  is taken from the first app partition, 0x10000 in flash, whether the file starts
  at flash address 0 or at the bootloader (0x1000 on the ESP32 and ESP32-S2).

Every image is validated with esptool's own image code (espimage.parse_app_image:
magic, segments, checksum, appended SHA-256, app descriptor) before it is stored.

Reading a stored artifact back (`read_stored`: the file named by its SHA-256, checked
against that SHA-256) is this module's too: `ImageStore.read` and serve's OTA stream
(fleet/otaserve.py, which has only a read-only database connection) both call it.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mpfleet.errors import MpfleetError
from mpfleet.images.espimage import (
    APP_PARTITION_OFFSET,
    BOOTLOADER_OFFSETS,
    IMAGE_MAGIC,
    AppImageInfo,
    ImageError,
    extract_app_from_merged,
    image_length,
    normalize_chip,
    parse_app_image,
)
from mpfleet.db.store import Store

ID_LEN = 12  # hex digits of the SHA-256: the image's id


class ImageStoreError(MpfleetError):
    """An image was refused, or is not in the store."""


class StoredImageMissing(ImageStoreError):
    """A stored artifact's file cannot be read; `reason` says why (the OS's words)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class StoredImageChanged(ImageStoreError):
    """A stored artifact's bytes no longer hash to the SHA-256 that names them."""


@dataclass(frozen=True)
class ImageRecord:
    id: str
    sha256: str
    chip: str
    version: str
    secure_version: int
    project: str
    idf_ver: str
    size: int
    source: str
    kind: str  # "app" or "merged" (firmware images), "app-bundle" (mpfleet app bundle)
    added: float

    def to_json(self) -> dict:
        return asdict(self)


def default_images_dir() -> Path:
    env = os.environ.get("MPFLEET_IMAGES")
    if env:
        return Path(env)
    return Path(os.environ.get("MPFLEET_HOME", Path.home() / ".mpfleet")) / "images"


def stored_path(images_dir: str | os.PathLike, sha256: str) -> Path:
    """Where the store keeps the artifact with this SHA-256."""
    return Path(images_dir) / f"{sha256}.bin"


def read_stored(images_dir: str | os.PathLike, sha256: str) -> bytes:
    """A stored artifact's bytes, checked against the SHA-256 that names it.
    Raises StoredImageMissing or StoredImageChanged (messages name the image id)."""
    path = stored_path(images_dir, sha256)
    image_id = sha256[:ID_LEN]
    try:
        data = path.read_bytes()
    except OSError as e:
        reason = e.strerror or str(e)
        raise StoredImageMissing(f"image {image_id}: cannot read {path}: {reason}", reason) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StoredImageChanged(f"image {image_id}: {path} does not match its SHA-256 (changed on disk)")
    return data


def read_image_file(path: str | os.PathLike) -> tuple[bytes, str, AppImageInfo]:
    """Read and verify a firmware image file for the store: (the app image, "app" or
    "merged", what the app says about itself); ImageStoreError says why not."""
    path = Path(path)
    app, kind = app_from_file(_read_file(path), path.name)
    return app, kind, parse_app_image(app)


def check_image_file(path: str | os.PathLike, chip: str | None = None) -> tuple[bytes, str, AppImageInfo]:
    """read_image_file, and refuse the image unless it is for `chip` (when given): what
    ImageStore.add checks, callable before any store or database is opened."""
    path = Path(path)
    app, kind, info = read_image_file(path)
    if chip is not None and info.chip != normalize_chip(chip):
        raise ImageStoreError(f"{path.name} is an image for {info.chip}, not for {normalize_chip(chip)}")
    return app, kind, info


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageStoreError(f"cannot read {path}: {e.strerror or e}") from None


def app_from_file(data: bytes, name: str) -> tuple[bytes, str]:
    """(the app image, "app" or "merged") from a file's bytes; ImageStoreError says why not."""
    if not data:
        raise ImageStoreError(f"{name}: empty file")
    app_error = None
    if data[0] == IMAGE_MAGIC:
        try:
            length = image_length(data)
            parse_app_image(data[:length])
        except ImageError as e:
            app_error = e  # maybe a merged image that starts with its bootloader
        else:
            tail = data[length:]
            if tail.strip(b"\xff"):
                raise ImageStoreError(f"{name}: {len(tail)} bytes follow the {length}-byte app image and they are "
                                      f"not erased flash (0xFF): a mismatched or corrupted file")
            return data[:length], "app"
    # A merged image: the file starts at flash address 0, or at the bootloader.
    merged_errors = []
    for base in sorted({0, *BOOTLOADER_OFFSETS.values()}, reverse=data[0] == IMAGE_MAGIC):
        at = APP_PARTITION_OFFSET - base
        if not (0 <= at < len(data)) or data[at] != IMAGE_MAGIC:
            continue
        try:
            return extract_app_from_merged(data, at), "merged"
        except ImageError as e:
            merged_errors.append(str(e))  # names the file offset of the app it tried
    if merged_errors:
        raise ImageStoreError(f"{name}: a merged image whose app is not valid: {merged_errors[0]}")
    if app_error is not None:
        raise ImageStoreError(f"{name}: {app_error}")
    raise ImageStoreError(f"{name}: neither an app image (first byte {data[0]:#04x}, not 0xE9) nor a merged "
                          f"flash image with an app at flash {APP_PARTITION_OFFSET:#x}")


class ImageStore:
    """Images in `images_dir`, their descriptions in the Store's `images` table."""

    def __init__(self, store: Store, images_dir: str | os.PathLike | None = None):
        self.store = store
        self.dir = Path(images_dir) if images_dir else default_images_dir()

    def add(self, path: str | os.PathLike, chip: str | None = None) -> tuple[ImageRecord, bool]:
        """Validate and store an image file; returns (record, True if it was new).
        `chip`: refuse the image unless it is for this chip."""
        path = Path(path)
        app, kind, info = check_image_file(path, chip)
        known = self._row("sha256 = ?", info.sha256)
        if known is not None:
            return known, False
        self._write(info.sha256, app)
        record = ImageRecord(info.sha256[:ID_LEN], info.sha256, info.chip, info.version, info.secure_version,
                             info.project_name, info.idf_ver, info.size, str(path.resolve()), kind, time.time())
        self._insert(record)
        return record, True

    def add_bundle(self, path: str | os.PathLike) -> tuple[ImageRecord, bool]:
        """Validate and store an app bundle (`mpfleet app bundle`); kind "app-bundle"."""
        from mpfleet.images.appbundle import BundleError, read_bundle

        path = Path(path)
        data = _read_file(path)
        try:
            bundle = read_bundle(data)
        except BundleError as e:
            raise ImageStoreError(f"{path.name}: {e}") from None
        known = self._row("sha256 = ?", bundle.sha256)
        if known is not None:
            return known, False
        self._write(bundle.sha256, data)
        mpy = bundle.manifest["mpy"]
        record = ImageRecord(bundle.sha256[:ID_LEN], bundle.sha256, "any", bundle.manifest["version"], 0,
                             "mpfleet-app", f"mpy{mpy['version']}", bundle.size, str(path.resolve()),
                             "app-bundle", time.time())
        self._insert(record)
        return record, True

    def _write(self, sha256: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = stored_path(self.dir, sha256)
        tmp = final.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, final)

    def _insert(self, record: ImageRecord) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT INTO images (id, sha256, chip, version, secure_version, project, idf_ver, size, "
                       "source, kind, added) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", astuple(record))

    def list(self) -> list[ImageRecord]:
        rows = self.store.db.execute(f"SELECT {_COLS} FROM images ORDER BY added, id").fetchall()
        return [ImageRecord(*r) for r in rows]

    def get(self, ref: str) -> ImageRecord:
        """An image by id, or by a unique prefix of its id or SHA-256."""
        # LOWER on both sides: SQLite's LIKE ignores ASCII case, PostgreSQL's does not
        rows = self.store.db.execute(f"SELECT {_COLS} FROM images WHERE LOWER(id) LIKE LOWER(?) "
                                     "OR LOWER(sha256) LIKE LOWER(?)", (ref + "%", ref + "%")).fetchall() if ref else []
        if not rows:
            raise ImageStoreError(f"no image {ref!r} (see `mpfleet image list`)")
        if len(rows) > 1:
            raise ImageStoreError(f"{ref!r} names {len(rows)} images: give more of the id")
        return ImageRecord(*rows[0])

    def read(self, ref: str) -> bytes:
        """The image's bytes, checked against its recorded SHA-256."""
        return read_stored(self.dir, self.get(ref).sha256)

    def _row(self, where: str, value) -> ImageRecord | None:
        row = self.store.db.execute(f"SELECT {_COLS} FROM images WHERE {where}", (value,)).fetchone()
        return ImageRecord(*row) if row else None


_COLS = "id, sha256, chip, version, secure_version, project, idf_ver, size, source, kind, added"


def astuple(record: ImageRecord) -> tuple:
    return tuple(asdict(record).values())
