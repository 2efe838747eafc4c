# Entry script of a virtual board's boot (see _simstart). The supervisor puts
# the simulator's runtime, precompiled to .mpy, first on the path
# (MPFLEET_SIM_RUNTIME), so that a boot does not compile it again.
import os
import sys

_runtime = os.getenv("MPFLEET_SIM_RUNTIME")
if _runtime:
    sys.path.insert(0, _runtime)

import _simstart  # noqa: E402 - from the runtime directory put first on the path above

_simstart.main()
