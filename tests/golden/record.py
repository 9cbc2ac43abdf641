"""Write the golden digests from a 1 x 1 run of today's core: `python -m tests.golden.record [CASE ...]`.

Run it only when an output is meant to change, and say which and why in the commit.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.golden.cases import CASES, output_digests, run_golden, save_golden


def record(name: str, scratch: Path) -> None:
    folder = scratch / name
    folder.mkdir()
    found = output_digests(run_golden(name, folder, "--speed-factor", "0"))
    save_golden(name, found)
    print(name, {file: sum(counter.values()) for file, counter in found.items()})


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        for name in sys.argv[1:] or CASES:
            record(name, Path(scratch))
