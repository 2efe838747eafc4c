# main.py: one wake of the mpfleet agent (firmware/lib/agent).
#
# Whatever goes wrong, the device must not end at the REPL with its battery
# draining: an exception is printed, noted in /last_crash.txt (an app update on
# trial reads it when it reports why the trial failed) and the chip
# deep-sleeps for a minute, which resets it. Ctrl-C from a console still
# reaches the REPL. Like boot.py, app updates never replace this file.
import machine

_CRASH_SLEEP_MS = 60000

try:
    from agent import wake

    wake.run()
except KeyboardInterrupt:
    raise
except Exception as e:  # noqa: BLE001 - last resort: never stay up after a crash
    import sys

    sys.print_exception(e)
    try:
        with open("/last_crash.txt", "w") as f:
            f.write(("%s: %s" % (type(e).__name__, e))[:200])
    except Exception:  # noqa: BLE001 - a full or broken filesystem must not stop the sleep
        pass
    machine.deepsleep(_CRASH_SLEEP_MS)
