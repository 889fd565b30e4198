"""The one error type of the deployment tooling."""

from __future__ import annotations


class DeployError(RuntimeError):
    """A deployment step that cannot go on; the message says what to do."""
