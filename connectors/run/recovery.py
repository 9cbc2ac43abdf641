"""Crash recovery for a run: the recovery folder, what it holds, and the Bytewax config it gives.

`--recovery-dir DIR` keeps Bytewax's recovery partitions (state snapshots and input positions,
taken together every snapshot interval) and `convoflow-run.json`, which names the job (its input,
outputs and flow settings) and says whether it finished. Running the same command again:

- on a new or empty folder: a fresh run; the partitions are created first;
- on a folder of an unfinished run of the same job: resumes where the last snapshot left off, in
  the same out-dir and lake (a JSONL output is cut back to its length at that snapshot and written
  on from there; the lake skips the commits it already has);
- on a folder of a finished run: nothing to do, said plainly (`RecoveryState.FINISHED`);
- on a folder of another job: refused, naming the settings that differ.

The run file also keeps facts of the job's first run that a resumed run must reuse to give the
same results (`remember`, `recall`): the lake snapshot the user history was first read from, and
where each lake table's commits of the job began.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
from bytewax.recovery import RecoveryConfig, init_db_dir

from dataflows.errors import ConvoflowError

RUN_FILE = "convoflow-run.json"
Job = Mapping[str, Any]
"""What identifies a job: JSON-ready settings that a resumed run must share with the crashed one."""


class RecoveryState(StrEnum):
    NEW = "new"
    RESUME = "resume"
    FINISHED = "finished"


@dataclass(frozen=True)
class Recovery:
    """A recovery folder and how often to snapshot into it.

    `snapshot_interval` is Bytewax's epoch length: at most that much work is redone after a crash.
    `backup_interval` keeps superseded snapshots that long (for copies of the folder elsewhere).
    """

    directory: Path
    snapshot_interval: timedelta = timedelta(seconds=5)
    backup_interval: timedelta = timedelta(0)

    def bytewax(self) -> RecoveryConfig:
        return RecoveryConfig(str(self.directory), self.backup_interval)

    @property
    def run_file(self) -> Path:
        return self.directory / RUN_FILE

    def open(self, job: Job, partitions: int) -> RecoveryState:
        """Check the folder against `job`; create it with `partitions` recovery partitions when new.

        Raises:
            ConvoflowError: the folder is not a directory, is not a convoflow recovery folder, or
                holds a run of another job.
        """
        if self.directory.exists() and not self.directory.is_dir():
            msg = f"--recovery-dir {self.directory} exists and is not a directory"
            raise ConvoflowError(msg)
        if not self.run_file.exists():
            if self.directory.exists() and any(self.directory.iterdir()):
                msg = (f"--recovery-dir {self.directory} is not empty and holds no {RUN_FILE}: "
                       "not a convoflow recovery folder; give an empty or new folder")
                raise ConvoflowError(msg)
            self.directory.mkdir(parents=True, exist_ok=True)
            init_db_dir(self.directory, partitions)
            self._write({"job": dict(job), "started_at": _now(), "finished_at": None, "runs": 1})
            return RecoveryState.NEW
        held = self._read()
        differ = _differences(held.get("job", {}), job)
        if differ:
            msg = (f"--recovery-dir {self.directory} holds a run of another job ({'; '.join(differ)}); "
                   "run the same command to resume it, or give another folder")
            raise ConvoflowError(msg)
        if held.get("finished_at"):
            return RecoveryState.FINISHED
        self._write({**held, "runs": int(held.get("runs", 1)) + 1})
        return RecoveryState.RESUME

    def finished_at(self) -> str | None:
        return self._read().get("finished_at") if self.run_file.exists() else None

    def mark_finished(self) -> None:
        """Record that the job ran to its end: running it again will do nothing."""
        self._write({**self._read(), "finished_at": _now()})

    def remember(self, key: str, value: Any) -> None:
        """Keep a JSON-ready fact of the job's first run (e.g. the lake snapshot it started from)."""
        held = self._read()
        self._write({**held, "facts": {**held.get("facts", {}), key: value}})

    def recall(self, key: str) -> Any:
        """A fact `remember`ed by the job's first run; None if it kept none under `key` (it died before)."""
        return self._read().get("facts", {}).get(key)

    def _read(self) -> dict[str, Any]:
        try:
            data = orjson.loads(self.run_file.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            msg = f"{self.run_file}: cannot be read ({exc}); delete --recovery-dir {self.directory} to start over"
            raise ConvoflowError(msg) from exc
        if not isinstance(data, dict):
            msg = f"{self.run_file}: expected a JSON object; delete --recovery-dir {self.directory} to start over"
            raise ConvoflowError(msg)
        return data

    def _write(self, data: Mapping[str, Any]) -> None:
        """Replace the run file atomically: a crash mid-write leaves the old one."""
        partial = self.run_file.with_suffix(".tmp")
        partial.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        os.replace(partial, self.run_file)


def _differences(held: Mapping[str, Any], job: Job) -> list[str]:
    return [f"{key}: {held.get(key)!r} then, {job.get(key)!r} now"
            for key in sorted(set(held) | set(job)) if held.get(key) != job.get(key)]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
