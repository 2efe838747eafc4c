# main.py: one wake of the mpfleet agent (firmware/lib/agent).
#
# Whatever goes wrong, the device must not end at the REPL with its battery
# draining: an exception is printed and the chip deep-sleeps for a minute,
# which resets it. Ctrl-C from a console still reaches the REPL.
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
    machine.deepsleep(_CRASH_SLEEP_MS)
