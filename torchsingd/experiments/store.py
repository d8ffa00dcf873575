"""The append-only log of finished runs that makes ``compare`` resumable.

Each finished run is one JSON line of ``<out>/runs.jsonl``, written and flushed to
disk as soon as the run ends; a run is identified by its spec's ``key``. A line cut
short by a crash is ignored (that run is simply redone). The file is strict JSON: a
non-finite number (a diverged run's loss) is written as the string ``"NaN"``,
``"Infinity"`` or ``"-Infinity"`` and read back as the float (lines of earlier
versions, with bare ``NaN``, are read too).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

RUNS_FILE = "runs.jsonl"

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _replace_non_finite(x: Any, replace) -> Any:
    """``x`` (nested dicts, lists and tuples) with each non-finite float ``v`` replaced
    by ``replace(v)``."""
    if isinstance(x, float) and not math.isfinite(x):
        return replace(x)
    if isinstance(x, dict):
        return {k: _replace_non_finite(v, replace) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_replace_non_finite(v, replace) for v in x]
    return x


def json_safe(x: Any) -> Any:
    """``x`` with NaN and infinities replaced by ``None`` (strict JSON, lossy)."""
    return _replace_non_finite(x, lambda _: None)


def _encode(x: Any) -> Any:
    """Non-finite floats as the strings of ``_NON_FINITE`` (strict JSON, lossless)."""
    return _replace_non_finite(
        x, lambda v: "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    )


def _decode(x: Any) -> Any:
    if isinstance(x, str):
        return _NON_FINITE.get(x, x)
    if isinstance(x, dict):
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


class RunStore:
    """Finished runs of one output directory, by key."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / RUNS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # a line cut short: end it, ignore it
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n")
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    record = _decode(json.loads(line))
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or "key" not in record:
                    raise ValueError(
                        f"{self.path} line {number} is not a run record of torchsingd "
                        "(no 'key'): is --out another program's directory? Choose "
                        "another --out."
                    )
                self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, record: dict[str, Any]) -> None:
        """Keep ``record`` and append it to the log (flushed and synced)."""
        self.records[record["key"]] = record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_encode(record), allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
