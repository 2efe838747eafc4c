"""The host's database: one schema module that owns every table and its migrations, the
store that opens it, and its upkeep (check, backup).

May import `mpfleet.errors` and `mpfleet.protocol`; never the fleet, the CLI or the simulator.
"""
