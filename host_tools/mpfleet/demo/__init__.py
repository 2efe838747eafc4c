"""The demos: `python -m mpfleet.demo` (a fleet, `make demo`) and `python -m mpfleet.demo.board`
(one virtual board). They may import every library room and the simulator, never the CLI.
"""
