"""The replay clock: maps replayed event time to wall-clock time at a speed factor.

Pure arithmetic on two anchors (the first event's time and the wall time the replay started),
so every partition, worker and process that is given the same anchors shares one clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplayClock:
    """Event time `event_origin` is replayed at wall time `wall_origin`; gaps shrink `speed` times.

    `speed == 0` means as fast as possible: nothing is ever waited for.
    """

    event_origin: float
    wall_origin: float
    speed: float

    def __post_init__(self) -> None:
        if self.speed < 0:
            msg = f"speed factor must be >= 0, got {self.speed}"
            raise ValueError(msg)

    @property
    def paced(self) -> bool:
        return self.speed > 0

    def wall_time_for(self, event_time: float) -> float:
        """The wall time at which an event of `event_time` is due (now, when unpaced)."""
        if not self.paced:
            return float("-inf")
        return self.wall_origin + (event_time - self.event_origin) / self.speed

    def event_time_at(self, wall_time: float) -> float | None:
        """The replayed event time that wall time `wall_time` stands for (None when unpaced)."""
        if not self.paced:
            return None
        return self.event_origin + (wall_time - self.wall_origin) * self.speed
