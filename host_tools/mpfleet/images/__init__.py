"""What goes onto a device: ESP app images, the image store (the only reader of stored
artifacts), app bundles of the agent's own code, and the firmware tree as deployed.

May import `mpfleet.errors`, `mpfleet.paths`, `mpfleet.boards` and `mpfleet.db`; never the
fleet, the CLI, the USB tools or the simulator.
"""
