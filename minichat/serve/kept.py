"""What a server without a store keeps in memory instead: the Responses, Conversations, Files, Batch and
fine-tuning APIs' objects, each visible only to the API key that made it (lost on restart)."""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any


class MemoryRows:
    """Rows (owner, *values) by id, oldest first. Values are copied in and out, so a caller never holds the kept
    object itself; with a limit only the newest `limit` rows are kept."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self._rows: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()  # the event loop and worker threads both call in

    def put(self, rid: str, owner: str | None, *values: Any) -> None:
        row = (owner, *copy.deepcopy(values))
        with self._lock:
            self._rows[rid] = row  # an update keeps the row's place
            while self.limit and len(self._rows) > self.limit:
                self._rows.popitem(last=False)

    def get(self, rid: str, owner: str | None) -> tuple | None:
        """The row's values, or None when there is no such row of this owner."""
        with self._lock:
            row = self._rows.get(rid)
        return copy.deepcopy(row[1:]) if row is not None and row[0] == owner else None

    def pop(self, rid: str) -> None:
        with self._lock:
            self._rows.pop(rid, None)

    def rows(self, owner: str | None = None, everyone: bool = False) -> list[tuple]:
        """(owner, *values) of this owner's rows (or everyone's), oldest first."""
        with self._lock:
            picked = [r for r in self._rows.values() if everyone or r[0] == owner]
        return copy.deepcopy(picked)
