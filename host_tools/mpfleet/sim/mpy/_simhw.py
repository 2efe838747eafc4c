# The virtual board's hardware, as seen from inside the device process.
#
# One Hardware object per process (the process *is* the chip between two
# resets): flash, RTC memory, the virtual clock, the watchdog and the record
# the process leaves for the supervisor when it stops. The shim modules
# machine, esp32, network, dht, time and socket all reach it through `hw`.
#
# Files in the device directory (all opened before LittleFS is mounted at /,
# after which host paths are out of the firmware's reach):
#   board.json     board definition (chip, partitions, sensors)
#   boot.json      written by the supervisor before each boot: reset cause,
#                  wake reason, clock, remembered slot, power-cut schedule, Wi-Fi
#   flash.bin      the 4 MiB NOR flash (see _simflash)
#   counters.bin   flash wear counters
#   rtc.bin        RTC slow memory (layout in _simfacts)
#   wdt            watchdog: timeout and feed count (layout in _simfacts; polled
#                  by the supervisor)
#   exit.json      why this process stopped (written once, by halt())
# The numbers both sides agree on (reset causes, the RTC memory limit, file
# layouts, exit reasons) are _simfacts'.

import gc
import json
import os
import struct
import utime

import _simfacts
from _simflash import NorFlash

hw = None
_TICKS_MAX = utime.ticks_add(0, -1)


def _load_json(path):
    with open(path) as f:
        return json.load(f)


class Hardware:
    def __init__(self, devdir):
        self.dir = devdir
        self.boot = _load_json(devdir + "/" + _simfacts.BOOT_FILE)
        self.board = _load_json(devdir + "/board.json")
        self.settings = _load_json(devdir + "/settings.json")
        regions = [(p["name"], p["offset"], p["size"]) for p in self.board["partitions"]]
        self.flash = NorFlash(
            devdir + "/flash.bin",
            self.board["flash_size"],
            regions,
            cut_after_ops=self.boot.get("cut_after_ops"),
            seed=self.boot.get("seed", 1),
            on_power_cut=self._power_cut,
            counters_path=devdir + "/counters.bin",
        )
        self._rtc_file = open(devdir + "/" + _simfacts.RTC_FILE, "r+b")
        self._exit_file = open(devdir + "/" + _simfacts.EXIT_FILE, "wb")
        self._wdt_file = open(devdir + "/" + _simfacts.WDT_FILE, "r+b")
        self._wdt_buf = bytearray(_simfacts.WDT_FILE_SIZE)
        self._wdt_feeds = 0
        self.wdt_timeout_ms = None
        self._start_ticks = utime.ticks_ms()
        self.clock_at_boot_s = self.boot["clock_s"]
        # Sleeps inside a wake (time.sleep*, machine.lightsleep) pass on the
        # device's clock at this many device seconds per real second; 0 skips
        # them (the device's ticks and RTC jump ahead, no real time passes).
        # Waits on sockets stay real: a broker answers in real time.
        self.sleep_scale = self.boot.get("clock_scale", 1)
        self.skipped_us = 0
        self._fed_at_ms = 0
        self.heap_base = 0
        self.alloc_base = 0
        self.ballast = None
        self.running_slot = None
        self.app = None
        self.halted = False
        self.output_mode = self.boot.get("mode", "run")

    # --- clock -----------------------------------------------------------
    def awake_ms(self):
        return utime.ticks_diff(utime.ticks_ms(), self._start_ticks) + self.skipped_us // 1000

    def ticks_ms(self):
        # The period is a power of two (ticks_add(0, -1) is its largest value).
        return (utime.ticks_ms() + self.skipped_us // 1000) & _TICKS_MAX

    def ticks_us(self):
        return (utime.ticks_us() + self.skipped_us) & _TICKS_MAX

    def sleep_us(self, us):
        """A sleep inside a wake, paced by sleep_scale (0: skipped). An armed
        watchdog left unfed through it resets the chip, as in real time."""
        us = int(us)
        if us <= 0:
            return
        real_us = int(us / self.sleep_scale) if self.sleep_scale else 0
        if real_us:
            utime.sleep_us(real_us)
        self.skipped_us += us - real_us
        if self.wdt_timeout_ms and _simfacts.watchdog_expired(self.wdt_timeout_ms,
                                                              self.awake_ms() - self._fed_at_ms):
            self.halt(_simfacts.EXIT_WDT, detail="watchdog unfed through a sleep")

    def clock_s(self):
        """The RTC's time: seconds since 1970 (kept over deep sleep and resets)."""
        return self.clock_at_boot_s + self.awake_ms() / 1000

    def set_clock_s(self, seconds):
        self.clock_at_boot_s = seconds - self.awake_ms() / 1000

    # --- RTC memory ------------------------------------------------------
    def rtc_memory(self):
        self._rtc_file.seek(0)
        head = self._rtc_file.read(_simfacts.RTC_LENGTH_SIZE)
        n = struct.unpack(_simfacts.RTC_LENGTH_FMT, head)[0] if len(head) == _simfacts.RTC_LENGTH_SIZE else 0
        if n > _simfacts.RTC_MEMORY_MAX:
            n = 0
        return self._rtc_file.read(n) if n else b""

    def set_rtc_memory(self, data):
        if len(data) > _simfacts.RTC_MEMORY_MAX:
            raise ValueError("buffer too long")
        self._rtc_file.seek(0)
        self._rtc_file.write(struct.pack(_simfacts.RTC_LENGTH_FMT, len(data)))
        self._rtc_file.write(data)

    # --- watchdog --------------------------------------------------------
    def arm_wdt(self, timeout_ms):
        self.wdt_timeout_ms = timeout_ms
        self.feed_wdt()

    def feed_wdt(self):
        self._fed_at_ms = self.awake_ms()
        self._wdt_feeds += 1
        struct.pack_into(_simfacts.WDT_FMT, self._wdt_buf, 0, self.wdt_timeout_ms or 0, self._wdt_feeds)
        self._wdt_file.seek(0)
        self._wdt_file.write(self._wdt_buf)

    # --- stopping --------------------------------------------------------
    def note_running(self):
        """Leave the booted slot and version in the exit record now: a process
        that ends without halt() (Ctrl-D at the interactive REPL, which the
        console supervisor turns into a soft reset) still tells the supervisor
        which firmware ran. halt() writes over it with a longer record."""
        note = {"running_slot": self.running_slot,
                "firmware_version": self.app["version"] if self.app else None}
        self._exit_file.write(json.dumps(note).encode())
        self._exit_file.flush()

    def _power_cut(self, detail):
        self.halt(_simfacts.EXIT_POWER_CUT, detail=detail)

    def _heap_live(self):
        # Bytes the firmware still holds (the simulator's own objects and the
        # ballast excluded); peaks are measured by searching the smallest
        # heap a run fits in (mpfleet.sim.heap).
        if not self.heap_base:
            return None
        gc.collect()
        return gc.mem_alloc() - self.heap_base

    def _allocated(self):
        # Bytes the firmware allocated during this boot (all of them, freed or
        # not): micropython.mem_total() counts from the interpreter's start.
        import micropython

        if not hasattr(micropython, "mem_total") or not self.heap_base:
            return None
        return micropython.mem_total() - self.alloc_base

    def halt(self, reason, **extra):
        """Stop the chip now: leave the exit record and end the process.

        Nothing after this point runs, not even `finally` blocks, as on a
        chip that enters deep sleep, resets or loses power.
        """
        record = {
            "reason": reason,
            "running_slot": self.running_slot,
            "firmware_version": self.app["version"] if self.app else None,
            "clock_s": self.clock_s(),
            "awake_ms": self.awake_ms(),
            "heap_live": self._heap_live(),
            "alloc_bytes": self._allocated(),
            "wdt_armed": self.wdt_timeout_ms is not None,
        }
        for key in extra:
            record[key] = extra[key]
        self.halted = True
        # Over note_running()'s record: this one has its keys and more, so it
        # is longer and no byte of the note is left behind.
        self._exit_file.seek(0)
        self._exit_file.write(json.dumps(record).encode())
        self._exit_file.close()
        # The process is killed outright: SystemExit would run the firmware's
        # finally blocks, which a real chip never does. $PPID of the shell
        # started by os.system is this interpreter's process.
        os.system("kill -9 $PPID")
        # Not reached; keep the firmware from continuing if kill failed.
        while True:
            utime.sleep(1)


def init(devdir):
    global hw
    hw = Hardware(devdir)
    return hw
