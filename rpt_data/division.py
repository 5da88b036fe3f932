"""How the input is divided between ranks, so that N ranks together tag exactly what 1 rank tags.

- `files`: with at least as many input files as ranks, file i (in expand_inputs order) goes to rank
  i % W. A file is a stream in continuous mode, so each rank still sees whole streams.
- `records` (structured mode, fewer files than ranks, or --limit): every rank reads every file and
  keeps record k (counted over good and bad records in reading order) when k % W == rank.
- `windows` (continuous mode, fewer files than ranks, or --limit): a record stripe would cut streams,
  so every rank reads and tokenizes everything (cheap next to the proxy) and scores window g of the
  whole run when g % W == rank: the same windows as one rank, each scored once.
Bad records are counted and reported by the rank that owns record k, so each is listed exactly once.
With --limit every rank reads the input (the limit counts good records of the whole run), hence a stripe.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Division:
    by: str  # all (one rank) | files | records | windows
    rank: int
    world_size: int
    files: list  # (path, format) this rank reads

    def owns(self, index: int) -> bool:
        """Whether the record (or window) `index` of this rank's reading order is this rank's."""
        return self.by in ("all", "files") or index % self.world_size == self.rank

    def describe(self) -> dict:
        return {"by": self.by, "files": [p for p, _ in self.files]}


def divide(files: list, mode: str, limit: int | None, rank: int, world_size: int) -> Division:
    if world_size == 1:
        return Division("all", rank, world_size, list(files))
    if len(files) >= world_size and limit is None:
        return Division("files", rank, world_size, list(files[rank::world_size]))
    return Division("records" if mode == "structured" else "windows", rank, world_size, list(files))
