"""Update jobs: the signed parameters of `ota` (firmware image) and `app` (app bundle) jobs.

Which room: host library; `mpfleet job create ota|app` (cli_jobs.py) and the demo
use it. The artifact itself is not in the job: the job names its size, SHA-256 and
version, which the device checks what it downloads against, and `serve` streams it
from the image store (otaserve.py) to devices that have an execution of the job.
"""

from __future__ import annotations

from mpfleet.errors import MpfleetError
from mpfleet.images.store import ImageRecord, ImageStore
from mpfleet.fleet.registry import Registry

DEFAULT_CHUNK = 4096
DEFAULT_WINDOW = 8


class UpdateError(MpfleetError):
    """An update job that cannot be made as asked."""


def _stream(chunk: int, window: int) -> dict:
    if chunk < 512 or chunk > 16384 or chunk % 512 or (4096 % chunk and chunk % 4096):
        raise UpdateError(f"chunk {chunk}: must be 512..16384 bytes and divide or be a multiple of 4096")
    if not 2 <= window <= 64:
        raise UpdateError(f"window {window}: must be 2..64 chunks")
    return {"chunk": chunk, "window": window}


def ota_params(images: ImageStore, ref: str, allow_downgrade: bool = False, chunk: int = DEFAULT_CHUNK,
               window: int = DEFAULT_WINDOW) -> tuple[dict, ImageRecord]:
    record = images.get(ref)
    if record.kind == "app-bundle":
        raise UpdateError(f"{record.id} is an app bundle: use `job create app --bundle {record.id}`")
    images.read(record.id)  # the bytes are there and intact before anything is signed
    params = {"image": record.id, "size": record.size, "sha256": record.sha256, "version": record.version,
              "secure_version": record.secure_version, "chip": record.chip, **_stream(chunk, window)}
    if allow_downgrade:
        params["allow_downgrade"] = True
    return params, record


def app_params(images: ImageStore, ref: str, chunk: int = DEFAULT_CHUNK,
               window: int = DEFAULT_WINDOW) -> tuple[dict, ImageRecord]:
    record = images.get(ref)
    if record.kind != "app-bundle":
        raise UpdateError(f"{record.id} is a firmware image, not an app bundle: use `job create ota --image`")
    images.read(record.id)
    return {"bundle": record.id, "size": record.size, "sha256": record.sha256, "version": record.version,
            **_stream(chunk, window)}, record


def check_targets(registry: Registry, devices: list[str], record: ImageRecord) -> None:
    """Refuse a firmware image for another chip than a target's board, or larger than
    its app slots (the device would refuse it too, after downloading its first block)."""
    from mpfleet.boards import load_board

    wrong = []
    for device in devices:
        board_name = registry.get(device).get("board")
        if not board_name:
            continue
        try:
            board = load_board(board_name)
        except MpfleetError:
            continue
        slots = [p.size for p in board.partitions if p.type == "app"]
        if board.chip != record.chip:
            wrong.append(f"{device} ({board_name}: {board.chip})")
        elif slots and record.size > min(slots):
            wrong.append(f"{device} ({board_name}: app slots of {min(slots)} bytes)")
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise UpdateError(f"image {record.id} ({record.chip}, {record.size} bytes) does not suit every target: "
                          f"{', '.join(wrong[:3])}{more}")
