# boot.py: the first file the port runs at every boot, before main.py.
# Tiny and never replaced by app updates, so that a bad update can always be
# rolled back from here: appslot.py picks the agent's app slot (docs/ota.md).
import sys

try:
    import appslot

    appslot.select()
except Exception as e:  # noqa: BLE001 - the agent in /lib must still start
    sys.print_exception(e)
sys.modules.pop("appslot", None)
