"""The one error type for a user's mistake (a missing path, an unknown model, a bad number, a corrupt file).

Library code raises `UsageError` with a message that names the argument, what was expected and what came
(`--ep-size 3 must divide num_experts=8`). The CLI (moekern/cli.py) catches it once, prints one line and
exits 2; `moekern --debug ...` shows the traceback instead. It subclasses ValueError, so callers that already
catch ValueError keep working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user's mistake: the message alone tells them what to change."""
