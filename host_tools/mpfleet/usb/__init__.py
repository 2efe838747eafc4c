"""USB field work on many attached boards: port enumeration and the per-port runner, the
byte transport (raw REPL over mpremote or ampy), the device-side commands built on it,
flashing with esptool, and the field commands (deploy, run a job, collect samples).

The transport only moves bytes; commands are built on it (as in mpremote):
transport.py (a board's raw REPL), device.py (what a board runs, link first),
ports.py (which boards: list_usb_ports, resolve_ports; each_port, PortResult,
BoardsFailed), flash.py (esptool), field.py (deploy, run, collect). Nothing here
prints or imports click; progress is a callback (port, done, total). May import
`mpfleet.errors`, `mpfleet.boards`, `mpfleet.protocol`, `mpfleet.db`, `mpfleet.images`,
`mpfleet.broker` and `mpfleet.fleet`; never `mpfleet.cli` or `mpfleet.sim`.
"""
