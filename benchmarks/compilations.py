"""Count XLA compilations and their time (shared by the benchmark scripts)."""

from __future__ import annotations

import collections


def compilation_counter() -> collections.Counter:
    """A Counter whose 'n' and 'seconds' grow with every XLA backend compilation."""
    import jax

    compiles = collections.Counter()

    def listener(event, duration, **kw):
        if "backend_compile" in event:
            compiles["n"] += 1
            compiles["seconds"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiles
