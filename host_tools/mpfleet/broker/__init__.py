"""The MQTT broker as the host sees it: starting a local one, configuring one for a fleet
(per-device accounts, ACLs, persistence), and the host's own MQTT link to it.

May import `mpfleet.errors`, `mpfleet.protocol` and `mpfleet.db`; never the fleet, the CLI
or the simulator.
"""
