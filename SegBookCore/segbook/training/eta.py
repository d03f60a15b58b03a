"""How long a fine-tune will take on this device: measured on its first iterations, said once.

The first iteration is left out (loader workers start, CUDA kernels are chosen); the next MEASURED ones
are timed and their mean, times the iterations left, is the estimate. Validation comes on top of it.
"""
from __future__ import annotations

import time

__all__ = ["Estimate", "describe_duration"]

WARMUP, MEASURED = 1, 5


def describe_duration(seconds: float) -> str:
    """12 s, 4 min, 1 h 05 min."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Estimate:
    """Call `step()` after every training iteration; it returns the estimate once (a dict for the
    progress protocol's "estimate" event), None otherwise."""

    def __init__(self, iterations_left: int, device: str, clock=time.monotonic):
        self.left, self.device, self.clock = iterations_left, device, clock
        self.done, self.t0 = 0, None

    def step(self) -> dict | None:
        self.done += 1
        if self.done == WARMUP:
            self.t0 = self.clock()
        elif self.done == WARMUP + MEASURED:
            per_iteration = (self.clock() - self.t0) / MEASURED
            remaining = self.left - self.done
            seconds = per_iteration * remaining
            # milliseconds kept: a short run on a fast machine is a fraction of a second, not zero
            return {"seconds": round(seconds, 3), "seconds_per_iteration": round(per_iteration, 4),
                    "iterations": self.left, "device": self.device,
                    "message": f"training will take about {describe_duration(seconds)} more on {self.device} "
                               f"({remaining} iterations at {per_iteration:.2f} s, measured; validation "
                               f"comes on top)"}
        return None
