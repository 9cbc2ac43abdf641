"""Read pattern definitions from a YAML or JSON file (the vocabulary is in `dataflows.patterns`)."""

from __future__ import annotations

from pathlib import Path

from dataflows.patterns.definitions import PatternDef, PatternError, patterns_from_text

_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def load_patterns(path: Path) -> tuple[PatternDef, ...]:
    """Every pattern, enabled or not, in `path` (`.yaml`, `.yml` or `.json`)."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        msg = f"{path}: unknown pattern file extension '{path.suffix}' (expected .yaml, .yml or .json)"
        raise PatternError(msg)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read: {exc}"
        raise PatternError(msg) from None
    return patterns_from_text(text, "json" if fmt == "json" else "yaml", str(path))
