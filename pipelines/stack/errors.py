"""The local stack's one error type: a one-line, actionable problem."""

from __future__ import annotations


class StackError(RuntimeError):
    """A one-line, actionable problem with the local stack."""
