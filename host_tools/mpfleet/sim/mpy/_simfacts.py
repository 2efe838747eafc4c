# The virtual board's facts: every number, name and file layout that the device
# process (the shims, the bootloader) and the supervisor (mpfleet.sim.board,
# sim.serial, sim.fleet) must agree on has its one definition here.
#
# Two interpreters load this file, each in its own way:
# - inside the device process (MicroPython unix port) the shims import it by its
#   top-level name, `import _simfacts`: the supervisor runs _simboot.py from
#   this directory (or puts its .mpy copy, MPFLEET_SIM_RUNTIME, first on the
#   path), and every shim imports it before LittleFS replaces sys.path;
# - on the host (CPython) it is `from mpfleet.sim.mpy import _simfacts`. sim/mpy
#   has no __init__.py and ships as package data of mpfleet.sim ("mpy/*.py" in
#   pyproject.toml), so CPython finds it as a namespace package, installed or
#   from the checkout, without touching sys.path (where this directory's own
#   time.py and socket.py would shadow the standard library's).
#
# So it is written in the subset both run: plain assignments of ints, floats,
# strings, tuples and dicts, and one plain function. No imports, and no
# const(): CPython has none, and these names must stay module attributes
# (machine re-exports them).

# --- reset causes: machine.reset_cause(), the ESP32 port's values ------------------
PWRON_RESET = 1  # power applied (power_on(), or after a cut)
HARD_RESET = 2  # EN pressed, machine.reset(), a panic: through the bootloader
WDT_RESET = 3  # the watchdog was not fed in time
DEEPSLEEP_RESET = 4  # woken from deep sleep
SOFT_RESET = 5  # Ctrl-D / machine.soft_reset(): the running firmware goes on
RESET_NAMES = {
    PWRON_RESET: "PWRON_RESET",
    HARD_RESET: "HARD_RESET",
    WDT_RESET: "WDT_RESET",
    DEEPSLEEP_RESET: "DEEPSLEEP_RESET",
    SOFT_RESET: "SOFT_RESET",
}

# --- wake reasons: machine.wake_reason(), esp_sleep_get_wakeup_cause() --------------
NO_WAKE = 0  # ESP_SLEEP_WAKEUP_UNDEFINED: the boot was not a wake from sleep
PIN_WAKE = 2
EXT0_WAKE = 2
EXT1_WAKE = 3
TIMER_WAKE = 4  # the only one the virtual board raises: deepsleep(time_ms > 0)
TOUCHPAD_WAKE = 5
ULP_WAKE = 6

# --- RTC slow memory: machine.RTC().memory() ---------------------------------------
# Survives deep sleep and every reset, not power loss. rtc.bin holds it as
#   offset 0  u16 little-endian  length n of what was stored (n <= RTC_MEMORY_MAX;
#                                a larger n reads as empty)
#   offset 2  n bytes            the data; the rest of the file is padding
RTC_MEMORY_MAX = 2048  # bytes, the ESP32 port's limit (ValueError beyond)
RTC_LENGTH_FMT = "<H"
RTC_LENGTH_SIZE = 2
RTC_FILE_SIZE = RTC_LENGTH_SIZE + RTC_MEMORY_MAX
# The RTC clock after power loss: 2000-01-01 00:00:00 UTC, in seconds since 1970.
RTC_EPOCH_AFTER_POWER_LOSS = 946684800.0

# --- the watchdog: machine.WDT ------------------------------------------------------
# The file `wdt`, rewritten by the device at every arm and feed, polled by the
#   supervisor:  u32 LE timeout_ms (0: not armed)  u32 LE feed count
WDT_FMT = "<II"
WDT_FILE_SIZE = 8


def watchdog_expired(timeout_ms, unfed_ms):
    """The supervisor's rule: an armed watchdog that went unfed for longer than its
    timeout resets the chip (WDT_RESET). `unfed_ms` counts from the last change of
    the feed count seen, or from the start of the boot."""
    return timeout_ms > 0 and unfed_ms > timeout_ms


# --- files of a board directory that both sides open --------------------------------
BOOT_FILE = "boot.json"  # the supervisor's orders for this boot (keys below)
EXIT_FILE = "exit.json"  # why the process stopped: {"reason": EXIT_..., ...}
RTC_FILE = "rtc.bin"
WDT_FILE = "wdt"
# boot.json: reset_cause (RESET_*), wake_reason (*_WAKE), keep_slot (the slot a
# deep-sleep wake or soft reset boots, else null), clock_s (the RTC clock at
# boot), cut_after_ops (flash operation count at which power is cut, or null),
# seed (of the torn write), wifi (the radio's world), mode ("run", "soft",
# "soft-raw", "exec"), clock_scale (device seconds per real second of a sleep
# inside the wake; 0 skips them; absent: real time), heap_budget (bytes left to the firmware), boot_count,
# and for mode "exec" stage_dir (the host directory mounted at /.host).
# exit.json: reason, running_slot, firmware_version, clock_s, awake_ms,
# heap_live, alloc_bytes, wdt_armed, and per reason sleep_ms or detail.

# --- exit reasons: exit.json's "reason" ---------------------------------------------
# Left by the device when it stops the chip:
EXIT_DEEPSLEEP = "deepsleep"  # machine.deepsleep(): next boot DEEPSLEEP_RESET (+ TIMER_WAKE)
EXIT_RESET = "reset"  # machine.reset(): next boot HARD_RESET
EXIT_SOFT_RESET = "soft_reset"  # machine.soft_reset(): next boot SOFT_RESET, same slot
EXIT_BOOTLOADER = "bootloader"  # machine.bootloader(): the ROM's download mode
EXIT_POWER_CUT = "power_cut"  # a scheduled cut tore a flash operation
EXIT_PANIC = "panic"  # the image crashes at boot (its sim note)
EXIT_NO_BOOTABLE_IMAGE = "no_bootable_image"  # no valid app in any slot: the chip halts
EXIT_REPL = "repl"  # main.py returned, or Ctrl-C: the board sits at the REPL
EXIT_WDT = "wdt"  # also the supervisor's, when it kills an unfed watchdog's process
EXIT_SIM_ERROR = "sim_error"  # the simulator itself could not go on
EXIT_EXEC_DONE = "exec_done"  # a host script (fs_put, fs_get) finished
# Decided by the supervisor, which ended or outlived the process:
EXIT_CRASHED = "crashed"  # the interpreter exited non-zero without a record
EXIT_HANG = "hang"  # the boot ran past the board's boot timeout
# After these the chip does not go on by itself.
STOPPING_REASONS = (EXIT_POWER_CUT, EXIT_REPL, EXIT_NO_BOOTABLE_IMAGE, EXIT_HANG, EXIT_CRASHED,
                    EXIT_BOOTLOADER)
