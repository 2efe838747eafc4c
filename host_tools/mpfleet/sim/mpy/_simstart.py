# Power-on of the virtual board: the second-stage bootloader, the port's
# start-up, then boot.py and main.py from the device's LittleFS.
#
# Started by _simboot.py, which the supervisor runs as
#   micropython -X heapsize=<budget+allowance> [-i] _simboot.py   (MPFLEET_SIM_DIR=<device dir>)
#
# 1. Bootloader (ESP-IDF rules, app rollback enabled):
#    - a deep-sleep wake boots the partition remembered in RTC memory without
#      reading otadata or validating the image;
#    - otherwise the active otadata entry picks the slot; an entry still
#      PENDING_VERIFY means the new image never confirmed itself, so it is
#      marked ABORTED and the other slot boots (rollback); an entry in state NEW
#      becomes PENDING_VERIFY; no valid entry boots the first app slot;
#    - the chosen image is validated (magic, chip, checksum, SHA-256); an
#      invalid one is skipped for the other slot; none valid: the chip halts.
# 2. Firmware start: an image whose sim note says {"crash": "boot"} panics here.
# 3. Port start-up: LittleFS from the "vfs" partition is mounted at / (made
#    afresh when it does not mount, as the ESP32 port's inisetup does),
#    sys.path = ['', '.frozen', '/lib'], then boot.py and, in the friendly
#    REPL mode, main.py.

import os
import sys

import _simfacts
import _simhw


def _log(msg):
    print(msg)


def _select_slot(hw):
    import _simimage
    import _simota

    board = hw.board
    flash = hw.flash
    slots = [p for p in board["partitions"] if p["type"] == "app"]
    boot = hw.boot
    if boot.get("keep_slot"):
        # Deep-sleep wake (and a soft reset, which never leaves the running
        # firmware): the RTC-remembered partition, without otadata. The real
        # bootloader skips validation here; the image is still read for its
        # version, and a broken one falls through to the normal path.
        for p in slots:
            if p["name"] == boot["keep_slot"]:
                try:
                    return p, _simimage.verify_slot(flash, p["offset"], p["size"], None)
                except _simimage.ImageInvalid as e:
                    _log("E (bootloader) remembered %s: %s" % (p["name"], e))
    otadata = None
    for p in board["partitions"]:
        if p["name"] == "otadata":
            otadata = p
    order = list(range(len(slots)))
    active = None
    if otadata is not None:
        active = _simota.active_entry(_simota.read_entries(flash, otadata["offset"]))
    if active is not None:
        chosen = active.slot(len(slots))
        if active.state == _simota.STATE_PENDING_VERIFY:
            _log("I (bootloader) ota_seq %d still PENDING_VERIFY: marking ABORTED, rolling back" % active.seq)
            _simota.set_state_of_active(flash, otadata["offset"], _simota.STATE_ABORTED)
            order = [i for i in order if i != chosen] + [chosen]
            active = None
        elif active.state in (_simota.STATE_INVALID, _simota.STATE_ABORTED):
            order = [i for i in order if i != chosen] + [chosen]
            active = None
        else:
            order = [chosen] + [i for i in order if i != chosen]
    for i in order:
        p = slots[i]
        try:
            info = _simimage.verify_slot(flash, p["offset"], p["size"], board["chip_id"])
        except _simimage.ImageInvalid as e:
            _log("E (bootloader) %s: %s" % (p["name"], e))
            continue
        if active is not None and i == active.slot(len(slots)) and active.state == _simota.STATE_NEW:
            _simota.set_state_of_active(flash, otadata["offset"], _simota.STATE_PENDING_VERIFY)
        return p, info
    return None, None


def _mount_filesystem():
    import esp32
    import vfs

    bdev = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")[0]
    try:
        vfs.mount(vfs.VfsLfs2(bdev), "/")
    except OSError:
        _log("I (inisetup) no filesystem on vfs: formatting LittleFS")
        vfs.VfsLfs2.mkfs(bdev)
        vfs.mount(vfs.VfsLfs2(bdev), "/")
    os.chdir("/")


def _run_file(name):
    """Run a file from the filesystem like pyexec_file_if_exists: True if it ran cleanly."""
    try:
        os.stat(name)
    except OSError:
        return True
    try:
        execfile(name, {"__name__": "__main__"})
        return True
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a board prints the traceback and goes on
        sys.print_exception(e)
        return False


def _leave_budget(hw):
    """Leave the firmware exactly its heap budget, in one contiguous block.

    On a real ESP32 machine/esp32/network live in flash and cost no heap; here
    the shims and this bootloader are Python objects on the heap. The
    interpreter is started with a larger heap; a block of the budget's size is
    reserved, every other free byte is filled with ballast, then the reserve is
    released: the firmware meets MemoryError where it would on the target.
    """
    import gc

    gc.collect()
    budget = hw.boot["heap_budget"]
    try:
        reserve = bytearray(budget)
    except MemoryError:
        hw.halt(_simfacts.EXIT_SIM_ERROR, detail="simulator heap allowance too small for a %d byte budget" % budget)
    ballast = [None] * 256
    size = 1
    while size * 2 <= gc.mem_free():
        size *= 2
    i = 0
    while size >= 16 and i < len(ballast):
        try:
            ballast[i] = bytearray(size)
            i += 1
        except MemoryError:
            size //= 2
    hw.ballast = ballast
    del reserve
    gc.collect()
    hw.heap_base = gc.mem_alloc()
    import micropython

    if hasattr(micropython, "mem_total"):
        hw.alloc_base = micropython.mem_total()


def _run_host_script(hw):
    """Host file access (the simulator's stand-in for a USB tool at the REPL):
    the staging directory is mounted at /.host while the script runs."""
    import vfs

    vfs.mount(vfs.VfsPosix(hw.boot["stage_dir"]), "/.host")
    try:
        execfile("/.host/_script.py", {"__name__": "__main__"})
        detail = None
    except Exception as e:  # noqa: BLE001 - reported to the host, which raises it
        sys.print_exception(e)
        detail = "%s: %s" % (type(e).__name__, e)
    vfs.umount("/.host")
    hw.halt(_simfacts.EXIT_EXEC_DONE, detail=detail)


def start(devdir, interactive):
    hw = _simhw.init(devdir)
    slot, app = _select_slot(hw)
    if slot is None:
        hw.halt(_simfacts.EXIT_NO_BOOTABLE_IMAGE, detail="no valid app image in any slot")
    hw.running_slot = slot["name"]
    hw.app = app
    hw.note_running()
    if app["sim_note"].get("crash") == "boot":
        _log("Guru Meditation Error: firmware %s panicked at boot" % app["version"])
        hw.halt(_simfacts.EXIT_PANIC, detail="image %s crashes at boot" % app["version"])

    # The port's built-in modules: import them before / is replaced by LittleFS.
    import dht  # noqa: F401 - imported before / is replaced
    import esp32  # noqa: F401 - imported before / is replaced
    import machine  # noqa: F401 - imported before / is replaced
    import network  # noqa: F401 - imported before / is replaced
    import socket  # noqa: F401 - imported before / is replaced
    import time  # noqa: F401 - imported before / is replaced

    _mount_filesystem()
    sys.path[:] = ["", ".frozen", "/lib"]
    _leave_budget(hw)
    mode = hw.output_mode
    if mode == "exec":
        _run_host_script(hw)
    if mode != "soft-raw":
        print("MicroPython %s on virtual %s (slot %s)" % (app["version"], hw.board["name"], slot["name"]))
    try:
        ok = _run_file("boot.py")
        if ok and mode in ("run", "soft"):
            _run_file("main.py")
    except KeyboardInterrupt:
        # Ctrl-C at the console stops main.py and leaves the REPL, as on a board.
        if not interactive:
            hw.halt(_simfacts.EXIT_REPL, detail="KeyboardInterrupt")
        return
    if interactive:
        return
    if hw.wdt_timeout_ms is not None:
        # main.py returned and nothing feeds the watchdog at the REPL.
        hw.halt(_simfacts.EXIT_WDT, detail="main.py returned; the REPL does not feed the WDT")
    hw.halt(_simfacts.EXIT_REPL, detail="main.py returned; the board sits at the REPL")


def main():
    start(os.getenv("MPFLEET_SIM_DIR"), os.getenv("MPFLEET_SIM_INTERACTIVE") == "1")
