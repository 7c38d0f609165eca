"""The one exception type the lab raises."""


class LabError(RuntimeError):
    """A lab server could not be started/stopped, or a lab wait timed out.

    The message carries the tail of the relevant log file(s), so a failing
    fixture explains itself in the pytest output.
    """
