"""The terminal view of a running job: counts, rates and open windows, then a summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from connectors.progress import GAUGES_FILE, read_gauges, read_tallies
from dataflows.flow import OutputKind


@dataclass
class RunStats:
    """Counts of a run read from its tally and gauge files in `state_dir`; `destination` names its outputs."""

    state_dir: Path
    destination: str
    started: float = field(default_factory=time.monotonic)
    counts: dict[str, int] = field(default_factory=dict)
    open_windows: int = 0
    rules_version: int = 0
    rate: float = 0.0
    _last: tuple[float, int] = (0.0, 0)

    def __post_init__(self) -> None:
        self._last = (self.started, 0)

    @property
    def alerts(self) -> dict[str, int]:
        prefix = f"{OutputKind.ALERTS}:"
        return {k.removeprefix(prefix): v for k, v in self.counts.items() if k.startswith(prefix)}

    @property
    def events_read(self) -> int:
        return sum(self.counts.get(kind, 0) for kind in (OutputKind.MESSAGES, OutputKind.MODERATED, OutputKind.DEAD_LETTER))

    def refresh(self) -> None:
        self.counts = read_tallies(self.state_dir)
        gauges = read_gauges(self.state_dir / GAUGES_FILE)
        self.open_windows, self.rules_version = gauges["open_windows"], gauges["rules_version"]
        now = time.monotonic()
        last_time, last_read = self._last
        if now - last_time >= 1.0:
            self.rate = (self.events_read - last_read) / (now - last_time)
            self._last = (now, self.events_read)

    def table(self, title: str) -> Table:
        elapsed = time.monotonic() - self.started
        table = Table(title=title, show_header=False, min_width=44)
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("events read", f"{self.events_read:,}")
        table.add_row("events/s", f"{self.rate:,.0f}")
        table.add_row("open windows", f"{self.open_windows:,}")
        table.add_row("windows emitted", f"{self.counts.get(OutputKind.WINDOWS, 0):,}")
        table.add_row("late events", f"{self.counts.get(OutputKind.LATE, 0):,}")
        table.add_row("dead-lettered", f"{self.counts.get(OutputKind.DEAD_LETTER, 0):,}")
        if self.rules_version:
            table.add_row("rule-set version", f"{self.rules_version:,}")
            table.add_row("masked / flagged", f"{self.counts.get('mask', 0):,} / {self.counts.get('flag', 0):,}")
            table.add_row("blocked (moderated)", f"{self.counts.get(OutputKind.MODERATED, 0):,}")
        for pattern, count in sorted(self.alerts.items()):
            table.add_row(f"alerts: {pattern}", f"{count:,}")
        table.add_row("elapsed", f"{elapsed:,.1f} s")
        return table

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        count = self.counts.get
        moderation = (f"{count(OutputKind.MODERATED, 0):,} blocked, {count('mask', 0):,} masked, "
                      f"{count('flag', 0):,} flagged, ") if self.rules_version else ""
        return (
            f"{self.events_read:,} event{'' if self.events_read == 1 else 's'} in {elapsed:,.1f} s "
            f"({self.events_read / max(elapsed, 1e-9):,.0f}/s): "
            f"{count(OutputKind.MESSAGES, 0):,} accepted, "
            f"{count(OutputKind.WINDOWS, 0):,} windows, "
            f"{count(OutputKind.LATE, 0):,} late, "
            f"{count(OutputKind.ALERTS, 0):,} alerts, {moderation}"
            f"{count(OutputKind.DEAD_LETTER, 0):,} dead-lettered → {self.destination}"
        )


class LiveView:
    """Redraws `RunStats` a few times a second on a terminal; silent elsewhere."""

    def __init__(self, stats: RunStats, console: Console, *, enabled: bool) -> None:
        self.stats = stats
        self.console = console
        self.live = Live(console=console, refresh_per_second=4, transient=False) if enabled else None

    def __enter__(self) -> LiveView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def poll(self) -> None:
        self.stats.refresh()
        if self.live is not None:
            self.live.update(self.stats.table("convoflow"))

    def __exit__(self, *exc: object) -> None:
        self.stats.refresh()
        if self.live is not None:
            self.live.update(self.stats.table("convoflow: done"))
            self.live.__exit__(None, None, None)
