"""The fleet: the device registry, the signing keys, the rollout engine, `serve` (the
dispatcher), sample ingest and export, the OTA artifact server, provisioning and the
signed parameters of update jobs.

May import `mpfleet.errors`, `mpfleet.boards`, `mpfleet.protocol`, `mpfleet.db`,
`mpfleet.broker` and `mpfleet.images`; never `mpfleet.cli`, `mpfleet.usb` or `mpfleet.sim`.
"""
