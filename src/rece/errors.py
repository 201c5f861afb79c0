"""One exception type whose message is a single line naming the problem and the fix."""

from __future__ import annotations


class ReceError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2."""
