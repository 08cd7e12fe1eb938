"""One base class for every error a user of the project can meet.

Each layer defines its own subclasses (``SchemaError``, ``CheckpointError``,
``ConfigError`` ...).  They also derive from the built-in class that fits
(``ValueError`` for bad input), so ``except ValueError`` keeps working; the
command-line tools catch :class:`GearsHError` and print its one-line message.
"""

from __future__ import annotations

__all__ = ["GearsHError"]


class GearsHError(Exception):
    """Base of all errors raised for bad input, bad files or unusable options."""
