"""`mpfleet deploy` over USB on virtual boards (real mpremote over pseudo-terminals).

  parallel    deploy the agent to 8 fresh boards at once vs one board after another
              (wall time, same run); ratio = sequential / parallel
  hash skip   deploy an unchanged tree again (each file's SHA-256 compared on the
              board, nothing copied) vs a full copy of the same tree, on 8 boards at
              once; ratio = full / unchanged
  transport   one board: a full deploy through mpremote (raw-paste mode) vs ampy

    .venv/bin/python bench/usb_deploy.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mpfleet.images.firmware import firmware_tree
from mpfleet.fleet.keys import KeyRing
from mpfleet.broker.link import parse_broker_url
from mpfleet.sim import VirtualBoard
from mpfleet.sim.serial import SerialConsole
from mpfleet.db.store import Store
from mpfleet.usb.transport import open_link
from mpfleet.usb.field import DeploySettings, deploy

BOARDS = 8


class Site:
    def __init__(self, root: Path, count: int):
        self.root = root
        self.store = Store(root / "db")
        self.ring = KeyRing(self.store, root / "keys")
        self.ring.init()
        self.files = firmware_tree()
        self.consoles = []
        for _ in range(count):
            vb = VirtualBoard.create(root / f"b{len(self.consoles)}")
            vb.power_on()
            self.consoles.append(SerialConsole(vb))

    def ports(self, n: int | None = None) -> list[str]:
        return [c.port for c in self.consoles[:n]]

    def deploy(self, ports: list[str], transport: str = "mpremote") -> float:
        settings = DeploySettings(board="virtual", broker=parse_broker_url("mqtt://10.0.0.2"), wifi_ssid="site",
                                  wifi_password="pw", transport=transport)
        t = time.monotonic()
        results = deploy(self.store, self.ring, ports, settings, files=self.files)
        took = time.monotonic() - t
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"deploy failed: {bad}")
        return took

    def wipe(self, ports: list[str]) -> None:
        """Remove the deployed tree, so the next deploy copies everything again."""
        for port in ports:
            with open_link(port) as link:
                link.exec("import os\nfor p in %r:\n    try:\n        os.remove(p)\n    except OSError:\n"
                          "        pass\n" % (sorted(self.files) + ["/config.json"],))

    def close(self) -> None:
        for c in self.consoles:
            c.close()
        self.store.close()


def run() -> dict:
    root = Path(tempfile.mkdtemp(prefix="mpfleet-bench-usb-"))
    site = Site(root, BOARDS + 1)
    try:
        ports = site.ports(BOARDS)
        parallel = site.deploy(ports)
        site.wipe(ports)
        sequential = sum(site.deploy([p]) for p in ports)
        unchanged = site.deploy(ports)
        site.wipe(ports)
        full = site.deploy(ports)
        spare = site.consoles[BOARDS].port
        mpremote_s = site.deploy([spare])
        site.wipe([spare])
        ampy_s = site.deploy([spare], transport="ampy")
        size = sum(len(d) for d in site.files.values())
    finally:
        site.close()
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        {"case": f"deploy {BOARDS} boards", "parallel_s": round(parallel, 2), "sequential_s": round(sequential, 2),
         "ratio": round(sequential / parallel, 1), "files": len(site.files), "bytes_per_board": size},
        {"case": f"redeploy {BOARDS} boards", "unchanged_s": round(unchanged, 2), "full_copy_s": round(full, 2),
         "ratio": round(full / unchanged, 1)},
        {"case": "one board, full deploy by transport", "mpremote_s": round(mpremote_s, 2), "ampy_s": round(ampy_s, 2),
         "ratio": round(ampy_s / mpremote_s, 1)},
    ]
    return {"name": "usb_deploy", "rows": rows, "ratio": rows[0]["ratio"],
            "ratio_label": f"sequential / parallel deploy of {BOARDS} boards"}


if __name__ == "__main__":
    for row in run()["rows"]:
        print(json.dumps(row))
    sys.exit(0)
