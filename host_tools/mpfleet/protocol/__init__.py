"""The host half of docs/protocol.md: what travels between host and device.

Device ids, topic names, the sample frame codec, job envelopes and their signatures, and
the grammar of durations and times. Pure functions over bytes and strings: this room may
import only `mpfleet.errors` and the standard library (and `cryptography` for signing).
"""
