"""USB field work on many attached boards: port enumeration and the per-port runner, the
byte transport (raw REPL over mpremote or ampy), the device-side commands built on it,
flashing with esptool, and the field commands (deploy, run a job, collect samples).

The transport only moves bytes; commands are built on it (as in mpremote). May import
`mpfleet.errors`, `mpfleet.boards`, `mpfleet.protocol`, `mpfleet.db`, `mpfleet.images`,
`mpfleet.broker` and `mpfleet.fleet`; never `mpfleet.cli` or `mpfleet.sim`.
"""
