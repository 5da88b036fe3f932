"""`rpt-data merge`: manifest.json of a multi-rank run, written from the ranks' completion records.

Each rank r of a W-rank run writes `rank-RRRRR.json` (the manifest of its own part, plus `rank`,
`world_size` and `division`; in a stripe also `read_errors`) and `rejects-RRRRR.jsonl`. The merge refuses unless
ranks 0..W-1 are all complete, agree on config, inputs, tokenizer, proxy and division (every unit of the input one
rank's, each shard's `units` its rank's, a stripe's ranks met the same read errors: check_division), and every
recorded shard is on disk with its recorded size; then it writes rejects.jsonl and, last, manifest.json (the same
schema as a 1-rank run's, shards of all ranks sorted by name, counts summed, plus `world_size`).
"""
from __future__ import annotations

import heapq
import json
import sys
from collections import Counter
from pathlib import Path

from rpt_common.bos import NO_BOS
from rpt_common.errors import UserError
from rpt_common.recipe import changed_options, differ
from rpt_common.shards import MANIFEST, RANK_RECORD_GLOB, REJECTS, SCHEMA_VERSION, rank_record_name, rank_rejects_name
from rpt_data.config import RUNTIME_ONLY
from rpt_data.writer import write_json_atomic, write_lines_atomic

# config keys that may differ between the ranks of one run, or between a run and its resume
PER_RANK = ("rank", "out", *RUNTIME_ONLY)


def totals(shards: list[dict]) -> dict:
    keys = ("rows", "positions", "scored", "nan", "selected")
    t = {k: sum(s[k] for s in shards) for k in keys}
    t["buckets"] = {b: sum(s["buckets"][b] for s in shards) for b in (shards[0]["buckets"] if shards else {})}
    return t


def same_run_config(a: dict, b: dict) -> list[str]:
    """Config keys (other than per-rank ones) whose values differ (the resume rule training shares)."""
    return changed_options(a, b, PER_RANK)


def input_key(f: dict) -> dict:
    """An input fingerprint as compared: a file by its resolved path, however it was spelled (a record written
    before `resolved` existed holds the path as given: resolved against this directory); a stream unit as is."""
    if "shard" in f:
        return f
    key = {k: v for k, v in f.items() if k != "path"}
    key.setdefault("resolved", str(Path(f["path"]).resolve()))
    return key


def same_inputs(a: list[dict] | None, b: list[dict] | None) -> bool:
    """True when two runs (or a run and its resume, or two ranks) read the same input files."""
    return [input_key(f) for f in a or []] == [input_key(f) for f in b or []]


def changed_inputs(old: list[dict] | None, new: list[dict] | None) -> list[str]:
    """The inputs (as a run names them) that differ between a run's record and now: changed, added or gone."""
    def name(f: dict) -> str:
        return f["path"] if f.get("shard") is None else f"{f['path']}#{f['shard']}"

    then = {json.dumps(input_key(f), sort_keys=True): name(f) for f in old or []}
    now = {json.dumps(input_key(f), sort_keys=True): name(f) for f in new or []}
    names = [now[k] for k in now if k not in then] + [then[k] for k in then if k not in now]
    if not names and list(then) != list(now):
        names = ["their order"]
    return list(dict.fromkeys(names))


def unit_key(f: dict) -> str:
    """Which unit an input fingerprint names, whatever its contents: a file by its resolved path, a stream unit by
    its spec and shard."""
    if "shard" in f:
        return f"{f['path']}#{f['shard']}"
    return input_key(f)["resolved"]


def changed_units(old: list[dict] | None, new: list[dict]) -> list[int] | None:
    """The indices of the units whose contents changed since a run's record, when it names the same units in the
    same order (a file fixed in place); None when units were added, removed or reordered."""
    old = old or []
    if [unit_key(f) for f in old] != [unit_key(f) for f in new]:
        return None
    return [i for i, (a, b) in enumerate(zip(old, new)) if input_key(a) != input_key(b)]


def moved_revision(old: list[dict] | None, new: list[dict]) -> str | None:
    """One sentence when a hub input was read at another commit than the one a run started from, else None."""
    then = {f["path"]: f["revision"] for f in old or [] if f.get("revision")}
    for f in new:
        if f.get("revision") and then.get(f["path"], f["revision"]) != f["revision"]:
            return (f"the hub dataset behind '{f['path']}' moved from revision {then[f['path']][:12]} to "
                    f"{f['revision'][:12]} since this output was started, so its windows would differ; rerun with "
                    "--overwrite to tag the new revision, or a new --out")
    return None


def read_rank_records(out: Path) -> dict[int, dict]:
    records = {}
    for p in sorted(out.glob(RANK_RECORD_GLOB)):
        try:
            rec = json.loads(p.read_text())
            rank, rec["world_size"] = int(rec["rank"]), int(rec["world_size"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{p} is corrupt; rerun that rank with --overwrite, then merge again") from None
        if p.name != rank_record_name(rank):
            raise UserError(f"{p} records rank {rank}; it was renamed or copied from another run")
        records[rank] = rec
    return records


def merge_out(out: str) -> dict:
    """Check that every rank of the run in `out` is complete and consistent; write and return manifest.json."""
    root = Path(out)
    if not root.is_dir():
        raise UserError(f"'{out}' is not a directory")
    records = read_rank_records(root)
    if not records:
        raise UserError(f"'{out}' holds no rank records (rank-*.json); only the output of a multi-rank "
                        "`rpt-data tag` (--world-size > 1) needs a merge")
    sizes = sorted({r["world_size"] for r in records.values()})
    if len(sizes) > 1:
        raise UserError(f"the rank records in '{out}' disagree on the world size ({' and '.join(map(str, sizes))}): "
                        "the directory mixes two runs; rerun every rank with --overwrite")
    world = sizes[0]
    for r in range(world):
        rec = records.get(r)
        if rec is None:
            raise UserError(f"rank {r} of {world} has not started (no {rank_record_name(r)} in '{out}'); run it "
                            f"(`rpt-data tag ... --rank {r} --world-size {world}` or its array task), then merge again")
        if not rec.get("complete"):
            raise UserError(f"rank {r} of {world} has not finished ({len(rec.get('shards', []))} shards so far); "
                            "rerun it with the same options (it resumes), then merge again")
    ref = records[0]
    for r in range(1, world):
        _check_same_run(records[r], ref, r)
    check_division(records, world)
    for r in range(world):
        for entry in records[r]["shards"]:
            path = root / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise UserError(f"shard {entry['file']} of rank {r} is {'changed' if path.is_file() else 'missing'}; "
                                "rerun that rank with the same options (it redoes the shard), then merge again")
        if not (root / rank_rejects_name(r)).is_file():
            raise UserError(f"{rank_rejects_name(r)} of rank {r} is missing; rerun that rank with --overwrite, "
                            "then merge again")

    write_lines_atomic(root / REJECTS, merged_rejects(root, world, [i["path"] for i in ref["inputs"]]))
    shards = sorted((s for r in range(world) for s in records[r]["shards"]), key=lambda s: s["file"])
    reasons = Counter()
    for r in range(world):
        reasons.update(records[r].get("bad_reasons", {}))
    manifest = {
        "schema_version": SCHEMA_VERSION, "complete": True,
        "config": {k: v for k, v in ref["config"].items() if k != "rank"},
        "tokenizer": ref["tokenizer"], "proxy": ref["proxy"], "bos": ref.get("bos", NO_BOS),
        **({"precision": ref["precision"]} if "precision" in ref else {}), "inputs": ref["inputs"],
        "shards": shards,
        "records": sum(records[r]["records"] for r in range(world)),
        "bad_records": sum(records[r]["bad_records"] for r in range(world)),
        "bad_reasons": dict(reasons.most_common()), "totals": totals(shards),
        "world_size": world, "division": ref["division"]["by"],
    }
    if ref["division"]["by"] == "files" and ref["config"].get("mode") == "structured" and ref["config"].get("id_field"):
        warn_ids_on_several_ranks(root, shards)
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def _check_same_run(rec: dict, ref: dict, r: int) -> None:
    if rec.get("schema_version") != ref.get("schema_version"):
        raise UserError(f"rank {r} was written with schema version {rec.get('schema_version')}, rank 0 with "
                        f"{ref.get('schema_version')}; rerun rank {r} with --overwrite")
    diff = same_run_config(rec["config"], ref["config"])
    if rec.get("division", {}).get("by") != ref.get("division", {}).get("by"):
        diff.append("division")
    if diff:
        raise UserError(f"rank {r} was tagged with other options than rank 0 ({differ(diff)}); "
                        f"rerun rank {r} with rank 0's options and --overwrite, then merge again")
    if not same_inputs(rec.get("inputs"), ref.get("inputs")):
        changed = changed_units(ref.get("inputs"), rec.get("inputs") or [])
        if changed:  # files fixed in place while some ranks had finished: a rerun records the new fingerprints
            names = ", ".join(f"'{ref['inputs'][i]['path']}'" for i in changed[:3])
            raise UserError(f"rank {r} saw other contents of {names}{' and more' if len(changed) > 3 else ''} than "
                            "rank 0 (changed between their runs); rerun every rank with the same options (each resumes: "
                            "a rank that does not read them only records the new fingerprints), then merge again")
        raise UserError(f"rank {r} saw other input files than rank 0 (they changed between the two runs); "
                        "rerun every rank with --overwrite")
    owners = [x.get("division", {}).get("owner") for x in (rec, ref)]
    if None not in owners and owners[0] != owners[1]:
        raise UserError(f"rank {r} divided the input files between the ranks otherwise than rank 0; "
                        "rerun every rank with --overwrite")
    if (rec.get("tokenizer") != ref.get("tokenizer") or rec.get("proxy") != ref.get("proxy")
            or rec.get("bos", NO_BOS) != ref.get("bos", NO_BOS)):
        raise UserError(f"rank {r} used another proxy model or tokenizer than rank 0; "
                        f"rerun rank {r} with rank 0's --model and --overwrite")
    if rec.get("precision") != ref.get("precision"):
        raise UserError(f"rank {r} ran the proxy in another precision than rank 0 ({rec.get('precision')} vs "
                        f"{ref.get('precision')}); rerun rank {r} on rank 0's kind of device and --dtype "
                        "with --overwrite")


def check_division(records: dict[int, dict], world: int) -> None:
    """The ranks' divisions (agreeing on their kind, and on `owner` where recorded: _check_same_run) give every unit
    of the run to exactly one rank: a stripe's ranks all read the same files; `files`: each file is one rank's;
    `segments`: each segment is one rank's. Where `owner` is recorded, each rank's part is the one it names, and each
    shard's `units` ([first, last] input indices; -1, a unit an older version did not know, is skipped) are units of
    its rank. Refuses in one sentence otherwise."""
    divs = [records[r].get("division") or {} for r in range(world)]
    by = divs[0].get("by")
    n = len(records[0].get("inputs") or [])
    again = "rerun every rank with --overwrite, then merge again"
    if by in ("records", "windows"):
        for r in range(1, world):
            if divs[r].get("files") != divs[0].get("files"):
                raise UserError(f"rank {r} read other input files than rank 0 though every rank of a {by} stripe "
                                f"reads them all; {again}")
        same_read_errors(records, world, by)
        return
    if by not in ("files", "segments"):
        return
    if by == "files":
        parts = [[p] for d in divs for p in d.get("files", [])]
        per_rank = [[(p,) for p in d.get("files", [])] for d in divs]
    else:
        parts = [tuple(u) for d in divs for u in d.get("segments", [])]
        per_rank = [[tuple(u) for u in d.get("segments", [])] for d in divs]
    seen = Counter(tuple(u) for u in parts)
    twice = next((u for u, c in seen.items() if c > 1), None)
    if twice is not None:
        what = f"'{twice[0]}'" + (f" (segment {twice[1]})" if len(twice) > 1 else "")
        ranks = [r for r in range(world) if twice in per_rank[r]]
        raise UserError(f"ranks {ranks[0]} and {ranks[1]} both tagged {what}, so the ranks' divisions of the input "
                        f"disagree; {again}")
    owner = divs[0].get("owner")
    if owner is None or any(d.get("owner") != owner for d in divs):
        if by == "files" and len(seen) != n:
            raise UserError(f"the ranks' divisions cover {len(seen)} of the {n} input files; {again}")
        return  # a record from before `owner`: the parts are disjoint, no more is known
    owners = [o if by == "segments" else [o] for o in owner] if isinstance(owner, list) else []
    if len(owners) != n or any(not isinstance(o, list) or not o or not all(isinstance(x, int) and 0 <= x < world for x in o)
                     for o in owners):
        raise UserError(f"the division recorded by the ranks does not give each of the {n} input files a rank; "
                        f"{again}")
    files = [iter(d.get("files", [])) for d in divs]
    expect: list[list] = [[] for _ in range(world)]
    for i, o in enumerate(owners):  # each file's path as the ranks that read it name it, in input order
        paths = {r: next(files[r], None) for r in sorted(set(o))}
        path = paths[o[0]]
        r = next((r for r in paths if paths[r] != path or path is None), None)
        if r is not None:
            raise UserError(f"rank {r} tagged another part of the input than the division its record names gives it "
                            f"(input file {i + 1}); {again}")
        for k, r in enumerate(o):
            expect[r].append((path, k) if by == "segments" else (path,))
    for r in range(world):
        if next(files[r], None) is not None or sorted(expect[r]) != sorted(per_rank[r]):
            raise UserError(f"rank {r} tagged another part of the input than the division its record names gives it; "
                            f"{again}")
        for entry in records[r].get("shards", []):
            for i in entry.get("units") or []:  # -1: windows whose unit was unknown (an older version), unchecked
                if isinstance(i, int) and i < 0:
                    continue
                if not (i < n and r in owners[i]):
                    raise UserError(f"shard {entry['file']} of rank {r} holds windows of input file {i + 1} "
                                    f"('{records[r]['inputs'][i]['path'] if 0 <= i < n else '?'}'), which the "
                                    f"division gives to another rank; {again}")


def same_read_errors(records: dict[int, dict], world: int, by: str) -> None:
    """Every rank of a stripe numbers every record of the input, so a read error that ended a file (`read_errors`:
    [file, line] of each, recorded whoever owns it; rpt_data.readers.read_unit retries first) must end it on every
    rank: one that only some ranks met (an error that persisted on one node) shifted their numbering, losing records
    and tagging others twice. Refuses in one sentence naming the file, the line and the ranks; a record without
    `read_errors` (an older version) is not compared."""
    known = {r: [tuple(e) for e in records[r]["read_errors"] if isinstance(e, list)] for r in range(world)
             if isinstance(records[r].get("read_errors"), list)}
    for source, line in dict.fromkeys(e for errs in known.values() for e in errs):
        who = [r for r in known if (source, line) in known[r]]
        if len(who) < len(known):
            others = [r for r in known if r not in who]
            at = f"line {line}" if line else "its start"
            raise UserError(f"{_ranks(who)} could not read '{source}' from {at} on (a read error; the rest of the "
                            f"file was skipped) where {_ranks(others)} read on: every rank of a {by} stripe numbers "
                            "every record, so the ranks' stripes no longer fit (records lost, others tagged twice); "
                            f"once the file reads on every node, rerun {_ranks(who)} with --overwrite, then merge "
                            "again")


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}"


def merged_rejects(root: Path, world: int, input_paths: list[str]):
    """The ranks' rejects as one file in a 1-rank run's order: input file order, then line. Each
    rank's file is already in that order, so a streaming k-way merge suffices."""
    order = {p: i for i, p in enumerate(input_paths)}

    def lines(r: int):
        with open(root / rank_rejects_name(r)) as f:
            for line in f:
                item = json.loads(line)
                yield (order.get(item["file"], len(order)), item["line"] or 0), line

    for _, line in heapq.merge(*(lines(r) for r in range(world)), key=lambda kv: kv[0]):
        yield line


def warn_ids_on_several_ranks(root: Path, shards: list[dict]) -> None:
    """--id-field duplicates are rejected within a rank; a duplicate in files of two ranks is only found here."""
    import polars as pl

    if not shards:
        return
    first = pl.scan_parquet([str(root / s["file"]) for s in shards]).filter(pl.col("window_index") == 0)
    dup = first.group_by("doc_id").len().filter(pl.col("len") > 1).collect()
    if dup.height:
        print(f"warning: {dup.height} id(s) (e.g. {dup['doc_id'][0]!r}) belong to records of files on different ranks; "
              "a 1-rank run would have rejected the later ones as `duplicate id`", file=sys.stderr)
