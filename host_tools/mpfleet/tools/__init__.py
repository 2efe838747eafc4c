"""Developer tools run from the Makefile (`python -m mpfleet.tools.check_firmware`).

May import `mpfleet.errors` and `mpfleet.paths` only: a tool checks the tree, it does not
reach into the fleet.
"""
