"""The append-only log of finished runs that makes ``compare`` resumable.

Each finished run is one JSON line of ``<out>/runs.jsonl``, written and flushed to
disk as soon as the run ends; a run is identified by its spec's ``key``. A line cut
short by a crash is ignored (that run is simply redone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUNS_FILE = "runs.jsonl"


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
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, record: dict[str, Any]) -> None:
        """Keep ``record`` and append it to the log (flushed and synced)."""
        self.records[record["key"]] = record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
