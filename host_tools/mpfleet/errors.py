"""The one error base of the host package.

Every expected failure (a bad file, a missing port, a device that said no) is raised as a
subclass of ``MpfleetError``; the CLI catches it once and prints ``mpfleet: <message>``.
Anything else escaping is a bug and keeps its traceback.
"""


class MpfleetError(Exception):
    """Base class of all errors the host tools report to the user without a traceback."""
