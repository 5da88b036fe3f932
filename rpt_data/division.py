"""How the input is divided between ranks, so that N ranks together tag exactly what 1 rank tags.

- `files`: with at least as many input files as ranks, whole files are dealt by size (bytes, from the input
  fingerprints), longest first, each to the rank with the least work so far (fewest bytes, then fewest files, then
  lowest rank): deterministic, and files of equal size go round-robin (file i -> rank i % W). A rank reads its files
  in expand_inputs order. A file is a stream in continuous mode, so each rank still sees whole streams.
- `records` (structured mode, fewer files than ranks, or --limit): every rank reads every file and
  keeps record k (counted over good and bad records in reading order) when k % W == rank.
- `segments` (continuous mode, a file larger than rpt_data.segments.SEGMENT_BYTES, at least W segments, no --limit):
  such files are cut into segments at points that depend on the file alone (1 rank cuts them too), and the segments
  (a file not cut is one) are dealt by size as files are; a rank tokenizes its segments plus a bounded lead-in each
  (rpt_data.segments.SegmentDivision, built by rpt_data.segments.divide_segments before `divide` is asked).
- `windows` (continuous mode, fewer files (segments) than ranks, or --limit): a record stripe would cut streams,
  so every rank reads and tokenizes everything (at most W segments without --limit) and scores window g of the
  whole run when g % W == rank: the same windows as one rank, each scored once.
Bad records are counted and reported by the rank that owns record k, so each is listed exactly once.
In a stripe (`records`, `windows`) every rank must number every record alike, so a read error (EIO, ESTALE) is
retried by rpt_data.readers.read_unit (`striped`): healed with the same numbering, or, failing at the same record on
every try (damage), one bad record that every rank meets at the same k (its owner reports it); an error that moves
between tries stops the rank (ReadError), and `rpt-data merge` refuses ranks that did not all meet the same read
errors (rpt_data.merge.same_read_errors: one rank's storage failed persistently where the others read on).
A `files` division is recorded (`owner`: the rank of every file) and pinned on resume: a file fixed since (same paths
in the same order, another size) stays with its rank, and a rank started later takes the owners another rank recorded.
A `segments` division records the rank of every segment (`owner`, one list per file), pinned while every file keeps
its segment count (rpt_data.segments.divide_segments); a resume whose own part (kind, files, segments) the new sizes
change otherwise refuses (rpt_data.pipeline.same_division), and `rpt-data merge`
checks that the ranks' parts give every unit to exactly one rank (rpt_data.merge.check_division).
With --limit every rank reads the input (the limit counts good records of the whole run), hence a stripe.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Division:
    by: str  # all (one rank) | files | records | windows
    rank: int
    world_size: int
    files: list  # (path, format) this rank reads
    owner: list | None = None  # `files`: the rank of each file of the run (expand_inputs order)

    def owns(self, index: int) -> bool:
        """Whether the record (or window) `index` of this rank's reading order is this rank's."""
        return self.by in ("all", "files") or index % self.world_size == self.rank

    def describe(self) -> dict:
        d = {"by": self.by, "files": [p for p, _ in self.files]}
        return d | ({"owner": list(self.owner)} if self.owner is not None else {})


def divide(files: list, mode: str, limit: int | None, rank: int, world_size: int,
           sizes: list[int] | None = None, owner: list[int] | None = None) -> Division:
    """This rank's part of `files` (expand_inputs order); `sizes`: each file's bytes (None: all equal); `owner`: the
    rank of each file as a record of this run gives it (a resume keeps it), else dealt by `sizes`."""
    if world_size == 1:
        return Division("all", rank, world_size, list(files))
    if len(files) >= world_size and limit is None:
        if owner is None or len(owner) != len(files):
            owner = balance(sizes if sizes is not None else [0] * len(files), world_size)
        return Division("files", rank, world_size, [f for f, r in zip(files, owner) if r == rank], list(owner))
    return Division("records" if mode == "structured" else "windows", rank, world_size, list(files))


def balance(sizes: list[int], world_size: int) -> list[int]:
    """The rank of each item: longest first, each to the least loaded rank (bytes, then items, then rank index);
    ties in size keep input order, so equal sizes go round-robin."""
    loads = [(0, 0, r) for r in range(world_size)]  # a heap of (bytes, items, rank)
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size, count, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (size + sizes[i], count + 1, r))
    return owner
