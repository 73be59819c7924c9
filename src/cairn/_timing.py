"""What the manager measures for adaptive save intervals: how long saves block training, and steps."""

from __future__ import annotations

__all__ = ["Timing"]

_WEIGHT = 0.5  # of the newest measurement in the running means: follows a change within a few saves


def _mean(old: float | None, new: float) -> float:
    return new if old is None else old + _WEIGHT * (new - old)


class Timing:
    """Running means of the seconds one save blocks training and of one training step without saves.

    The manager calls :meth:`call` at each ``save()`` call and :meth:`saved` after each save it
    wrote; step time is the time between two calls, less the saves in between, over the steps.
    """

    def __init__(self) -> None:
        self.save_seconds: float | None = None
        """How long a save blocks the caller (a running mean); None before the first save."""
        self.step_seconds: float | None = None
        """Seconds per training step, saves excluded (a running mean); None until two calls."""
        self._previous: tuple[int, float] | None = None
        self._blocked = 0.0

    def call(self, step: int, now: float) -> None:
        """A ``save(step)`` call at monotonic time ``now``."""
        if self._previous is not None and step > self._previous[0]:
            elapsed = now - self._previous[1] - self._blocked
            if elapsed >= 0:
                self.step_seconds = _mean(self.step_seconds, elapsed / (step - self._previous[0]))
        self._previous, self._blocked = (step, now), 0.0

    def saved(self, seconds: float) -> None:
        """A save that blocked the caller ``seconds``."""
        self.save_seconds = _mean(self.save_seconds, seconds)
        self._blocked += seconds
