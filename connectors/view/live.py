"""The terminal view of a running job: counts and rates, a progress bar for a replay, and panes of
what happens (windows as they close, alerts as they fire, moderated messages, dead letters); then a
summary line.

Everything comes from the files the run keeps in its state folder (`connectors.view.progress`,
`connectors.view.glimpses`), read a few times a second on the poller's thread: the view never touches
the flow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from connectors.view.glimpses import Glimpse, latest_glimpses
from connectors.view.progress import GAUGES_FILE, events_read, read_figures, read_gauges, read_tallies
from dataflows.flow import OutputKind

REFRESH_PER_SECOND = 4


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
    panes: dict[str, list[Glimpse]] = field(default_factory=dict)
    replay: tuple[int, int] | None = None
    """Bytes of the replayed file read so far, and in all (None when not a replay)."""
    _last: tuple[float, int] = (0.0, 0)

    def __post_init__(self) -> None:
        self._last = (self.started, 0)

    @property
    def alerts(self) -> dict[str, int]:
        prefix = f"{OutputKind.ALERTS}:"
        return {k.removeprefix(prefix): v for k, v in self.counts.items() if k.startswith(prefix)}

    @property
    def events_read(self) -> int:
        return events_read(self.counts)

    def refresh(self) -> None:
        self.counts = read_tallies(self.state_dir)
        gauges = read_gauges(self.state_dir / GAUGES_FILE)
        self.open_windows, self.rules_version = gauges["open_windows"], gauges["rules_version"]
        self.panes = latest_glimpses(self.state_dir)
        parts = read_figures(self.state_dir, "replay")
        self.replay = (sum(p["read"] for p in parts), sum(p["total"] for p in parts)) if parts else None
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


def _pane(title: str, rows: list[tuple[str, str]], key_style: str = "cyan") -> Panel:
    """A titled pane of (key, text) rows, newest first; both already rich markup."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style=key_style, no_wrap=True)
    grid.add_column()
    for key, text in rows:
        grid.add_row(key, text)
    return Panel(grid, title=title, title_align="left")


def windows_pane(glimpses: list[Glimpse]) -> Panel:
    """The latest windows closed: session, span, counts, the conversation's first lines, the assistant's reply."""
    rows = []
    for g in reversed(glimpses):
        counts = ", ".join(f"{sender} {n}" for sender, n in g["counts"].items())
        span = f"{str(g['start'])[11:19]}-{str(g['end'])[11:19]}"
        many = g["messages"]
        body = [f"[dim]{span}  {many} message{'' if many == 1 else 's'} ({escape(counts)})[/dim]"]
        body += [escape(line) for line in g["lines"]]
        if g.get("reply"):
            body.append(f"[green]reply:[/green] {escape(g['reply'])}")
        if g.get("summary"):
            body.append(f"[green]summary:[/green] {escape(g['summary'])}")
        rows.append((escape(str(g["session"])), "\n".join(body)))
    return _pane("windows closed", rows)


def alerts_pane(glimpses: list[Glimpse]) -> Panel:
    """The latest alerts: pattern (red for warnings), key and summary."""
    rows = []
    for g in reversed(glimpses):
        colour = "red" if g["severity"] in ("warning", "critical", "error") else "blue"
        rows.append((f"[{colour}]{escape(str(g['pattern']))}[/{colour}]", f"{escape(str(g['key']))}: {escape(g['summary'])}"))
    return _pane("alerts", rows, key_style="")


def moderated_pane(glimpses: list[Glimpse]) -> Panel:
    """The latest blocked messages and the rule's reason."""
    return _pane("moderated", [(escape(f"{g['session']} {g['sender']}"),
                                f"{escape(g['text'])}\n[yellow]{escape(g['reason'])}[/yellow]") for g in reversed(glimpses)])


def dead_letters_pane(glimpses: list[Glimpse]) -> Panel:
    """The latest rejected lines: where, and why."""
    return _pane("dead letters", [(escape(g["where"]), escape(g["reason"])) for g in reversed(glimpses)])


class LiveView:
    """Redraws `RunStats` a few times a second on a terminal; silent elsewhere."""

    def __init__(self, stats: RunStats, console: Console, *, enabled: bool) -> None:
        self.stats = stats
        self.console = console
        self.live = Live(console=console, refresh_per_second=REFRESH_PER_SECOND, transient=False) if enabled else None
        self.bar = Progress(TextColumn("replay"), BarColumn(), DownloadColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            console=console, auto_refresh=False)
        self.task = self.bar.add_task("replay", total=None)

    def __enter__(self) -> LiveView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def poll(self) -> None:
        self.stats.refresh()
        if self.live is not None:
            self.live.update(self.render("convoflow"))

    def render(self, title: str) -> RenderableType:
        """The whole view: progress, counters beside the alerts, then the other panes."""
        stats, parts = self.stats, list[RenderableType]()
        if stats.replay is not None:
            read, total = stats.replay
            self.bar.update(self.task, completed=read, total=total)
            parts.append(self.bar)
        top = Table.grid(padding=(0, 1), expand=True)
        top.add_column(width=46)
        top.add_column(ratio=1)
        top.add_row(stats.table(title), alerts_pane(stats.panes.get("alerts", [])))
        parts.append(top)
        parts.append(windows_pane(stats.panes.get("windows", [])))
        bottom = Table.grid(padding=(0, 1), expand=True)
        bottom.add_column(ratio=1)
        bottom.add_column(ratio=1)
        bottom.add_row(moderated_pane(stats.panes.get("moderated", [])), dead_letters_pane(stats.panes.get("dead_letter", [])))
        parts.append(bottom)
        return Group(*parts)

    def __exit__(self, *exc: object) -> None:
        self.stats.refresh()
        if self.live is not None:
            self.live.update(self.render("convoflow: done"))
            self.live.__exit__(None, None, None)
