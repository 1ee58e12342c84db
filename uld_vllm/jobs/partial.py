"""Resumable JSONL output: rows go to ``OUT.partial`` as they finish, ``OUT`` appears only once
every row is there (in input order, renamed atomically), so a file at ``OUT`` is always
complete and a partial one is never mistaken for it.

Beside the partial file, ``OUT.partial.meta.json`` records the settings that produced it; a
rerun resumes only with the same settings (else its rows would mix two configurations).
A kill can leave half a line at the end of the partial file: it is cut off on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from uld_vllm.errors import UldError


def key_of(row_id) -> str:
    """Ids compare by their JSON text: 7 and "7" are different ids."""
    return json.dumps(row_id, sort_keys=True)


class PartialJsonl:
    def __init__(self, out: str | os.PathLike, settings: dict, overwrite: bool = False):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.meta = self.out.with_name(self.out.name + ".partial.meta.json")
        self.settings = json.loads(json.dumps(settings))  # what a reload would give
        if not self.out.parent.is_dir():
            raise UldError(f"output folder {self.out.parent} does not exist", "create it first")
        if overwrite:
            for p in (self.out, self.partial, self.meta):
                p.unlink(missing_ok=True)
        self.done: dict[str, dict] = {}
        self._fh = None

    @property
    def complete(self) -> bool:
        return self.out.exists() and not self.partial.exists()

    def load(self) -> dict[str, dict]:
        """Rows already in the partial file, by id key (empty for a fresh run)."""
        if not self.partial.exists():
            return self.done
        if not self.meta.exists():
            raise UldError(f"{self.partial} has no {self.meta.name} beside it, so its settings "
                           "are unknown", "delete it, or pass --overwrite to start over")
        try:
            old = json.loads(self.meta.read_text())
        except json.JSONDecodeError:
            raise UldError(f"{self.meta} is not valid JSON",
                           "pass --overwrite to start over") from None
        if old != self.settings:
            diff = sorted(k for k in set(old) | set(self.settings)
                          if old.get(k) != self.settings.get(k))
            raise UldError(f"{self.partial} was written with other settings ({', '.join(diff)} "
                           "differ)", "rerun with the same settings to resume, or pass "
                           "--overwrite to start over")
        good = 0
        with open(self.partial, "rb") as f:
            data = f.read()
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # half-written last line of a killed run
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            self.done[key_of(row["id"])] = row
            good += len(line)
        if good < len(data):
            with open(self.partial, "r+b") as f:
                f.truncate(good)
        return self.done

    def open(self) -> None:
        if not self.partial.exists():
            self.meta.write_text(json.dumps(self.settings, indent=1))
        self._fh = open(self.partial, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()  # a killed run keeps every row it reported
        self.done[key_of(row["id"])] = row

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self, ids: list) -> int:
        """All ``ids`` written: the complete file, in ``ids`` order, replaces the partial."""
        self.close()
        missing = [i for i in ids if key_of(i) not in self.done]
        if missing:
            raise RuntimeError(f"{len(missing)} rows missing at finish (first: {missing[0]!r})")
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i in ids:
                f.write(json.dumps(self.done[key_of(i)]) + "\n")
        os.replace(tmp, self.out)
        self.partial.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        return len(ids)
