"""`rpt-data inspect` (polars summary + plot) and `rpt-data validate` (shards vs. manifest)."""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rpt_common.errors import UserError
from rpt_common.shards import (MANIFEST, SHARD_SCHEMA, file_digest, footer_problems,
                                read_manifest, shard_paths)

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def _metric_col(manifest: dict) -> str:
    return "topk_entropy" if manifest["config"]["metric"] == "topk" else "entropy"


def listed_shards(out: str, manifest: dict) -> list[str]:
    """The shards the manifest records (a shard a killed run renamed but never recorded is left out)."""
    return [os.path.join(out, s["file"]) for s in manifest.get("shards", [])]


def positions_frame(out: str, paths: list[str], stats: tuple[str, ...] = ("entropy", "topk_entropy")) -> pl.LazyFrame:
    """One row per scored position: doc_id, window_index, pos (index in window) and the `stats` columns."""
    if not paths:
        raise UserError(f"'{out}' holds no shard files")
    lf = pl.scan_parquet(paths)
    return (
        lf.select("doc_id", "window_index", "score_start", *stats,
                  pos=pl.int_ranges(0, pl.col("token_ids").list.len()))
        .explode("pos", *stats)
        .filter(pl.col("pos") >= pl.col("score_start"))
    )


def unreadable(out: str, paths: list[str], error: Exception, also: str = "") -> UserError:
    """The refusal for shards polars could not read: it names the first listed shard whose Parquet footer does
    not read (a truncated or overwritten file), else the error as polars gave it; `rpt-data validate` checks more."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            pq.read_metadata(path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return UserError(f"cannot read shard '{path}' ({first}): it is damaged; re-tag it (`rpt-data tag` "
                             f"resumes), or run `rpt-data validate {out}` for every problem")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return UserError(f"cannot read the shards of '{out}'{also} ({type(error).__name__}: {first}); "
                     f"run `rpt-data validate` on them to find the damaged file")


def inspect_out(out: str, plot: str | None = None, top: int = 5) -> None:
    manifest = read_manifest(out)
    try:
        _inspect(out, manifest, plot, top)
    except (pl.exceptions.PolarsError, OSError) as e:  # a damaged shard: named when its footer does not read
        raise unreadable(out, listed_shards(out, manifest), e)


def _inspect(out: str, manifest: dict, plot: str | None, top: int) -> None:
    console = Console()
    metric = _metric_col(manifest)
    cfg = manifest["config"]
    paths = listed_shards(out, manifest)
    if not paths:
        raise UserError(f"'{out}' holds no shards yet (its manifest lists none)")
    rows = pl.scan_parquet(paths).select(
        rows=pl.len(), tokens=pl.col("token_ids").list.len().sum(), selected=pl.col("selected").list.len().sum(),
        docs=pl.col("doc_id").n_unique(),
    ).collect().row(0, named=True)
    pos = positions_frame(out, paths)

    t = Table(title=f"{out}  ({'complete' if manifest.get('complete') else 'INCOMPLETE'}, {len(manifest['shards'])} shards)")
    for c in ("documents", "windows", "tokens", "scored", f"selected (> {cfg['select_above']})", "bad records"):
        t.add_column(c, justify="right")
    scored = pos.select(pl.col(metric).is_not_null().sum()).collect().item()
    t.add_row(*(f"{x:,}" for x in (rows["docs"], rows["rows"], rows["tokens"], scored, rows["selected"],
                                    manifest.get("bad_records", 0))))
    console.print(t)

    bt = Table(title=f"positions per bucket ({metric}, nats)")
    for c in ("bucket", "threshold", "positions", "share of scored"):
        bt.add_column(c, justify="right")
    names = manifest["shards"][0]["buckets"].keys() if manifest["shards"] else []
    for name, thr in zip(names, cfg["buckets"]):
        n = pos.select((pl.col(metric) > thr).sum()).collect().item()
        bt.add_row(name, f"> {thr:g}", f"{n:,}", f"{n / max(scored, 1):.1%}")
    console.print(bt)

    qt = Table(title="entropy quantiles (nats)")
    qt.add_column("metric")
    for q in QUANTILES:
        qt.add_column(f"p{int(q * 100)}", justify="right")
    qt.add_column("mean", justify="right")
    for col in ("entropy", "topk_entropy"):
        vals = pos.select([pl.col(col).quantile(q).alias(str(q)) for q in QUANTILES] + [pl.col(col).mean().alias("m")]).collect().row(0)
        qt.add_row(col, *(f"{v:.3f}" if v is not None else "-" for v in vals))
    console.print(qt)

    by_pos = position_profile(pos, metric, cfg["window"])
    pt = Table(title=f"mean {metric} by position in window (context-prefix {cfg['context_prefix']}: "
                     "a flat profile means no early-position bias)")
    for c in ("positions", "n", f"mean {metric}"):
        pt.add_column(c, justify="right")
    for r in by_pos.iter_rows(named=True):
        pt.add_row(f"{r['lo']}-{r['hi']}", f"{r['n']:,}", f"{r['mean']:.3f}")
    console.print(pt)

    if top > 0:
        hardest(paths, pos, metric, top, console)
    if plot:
        plot_histograms(pos, metric, cfg["buckets"], by_pos, plot)
        console.print(f"plot written to {plot}")


def position_profile(pos: pl.LazyFrame, metric: str, window: int, bins: int = 8) -> pl.DataFrame:
    width = max(1, -(-window // bins))
    return (
        pos.with_columns(b=pl.col("pos") // width)
        .group_by("b").agg(n=pl.col(metric).is_not_null().sum(), mean=pl.col(metric).mean())
        .sort("b").with_columns(lo=pl.col("b") * width, hi=pl.col("b") * width + width - 1)
        .collect()
    )


def hardest(paths: list[str], pos: pl.LazyFrame, metric: str, top: int, console: Console) -> None:
    worst = pos.drop_nulls(metric).sort(metric, descending=True).head(top).collect()
    texts = (
        pl.scan_parquet(paths).select("doc_id", "window_index", "text", "token_bytes")
        .join(worst.lazy().select("doc_id", "window_index").unique(), on=["doc_id", "window_index"])
        .collect()
    )
    lookup = {(r["doc_id"], r["window_index"]): r for r in texts.iter_rows(named=True)}
    ht = Table(title=f"{top} hardest positions ({metric})")
    for c in ("doc_id", "pos", metric, "context ... \\[next token]"):
        ht.add_column(c, overflow="fold")
    for r in worst.iter_rows(named=True):
        w = lookup[(r["doc_id"], r["window_index"])]
        data, ends, p = w["text"].encode(), w["token_bytes"], r["pos"]
        start = ends[p - 1] if p > 0 else 0
        ctx = data[max(0, start - 80) : start].decode(errors="replace")
        nxt = data[start : ends[p]].decode(errors="replace")
        ht.add_row(escape(str(r["doc_id"])), str(p), f"{r[metric]:.3f}", escape(f"...{ctx!r}[{nxt!r}]"))
    console.print(ht)


def plot_histograms(pos: pl.LazyFrame, metric: str, buckets: list[float], by_pos: pl.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pos.select("entropy", "topk_entropy").drop_nulls().collect()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, col in zip(axes[:2], ("entropy", "topk_entropy")):
        ax.hist(df[col].to_numpy(), bins=60, color="#4477aa")
        for b in buckets:
            ax.axvline(b, color="#cc3311", ls="--", lw=1)
        ax.set_title(f"{col} (nats){'  <- tags' if col == metric else ''}")
        ax.set_xlabel("nats")
        ax.set_ylabel("positions")
    axes[2].plot(by_pos["lo"].to_numpy(), by_pos["mean"].to_numpy(), marker="o")
    axes[2].set_title(f"mean {metric} by position in window")
    axes[2].set_xlabel("position in window (tokens)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validate_out(out: str) -> list[str]:
    """Every way the shards disagree with the manifest or the schema, as readable sentences."""
    manifest = read_manifest(out)
    try:
        return _validate(out, manifest)
    except (KeyError, TypeError, AttributeError) as e:  # a manifest with missing or mistyped entries
        return [f"{MANIFEST}: malformed manifest ({type(e).__name__}: {e}); re-tag the corpus with `rpt-data tag`"]


def _validate(out: str, manifest: dict) -> list[str]:
    import pyarrow.parquet as pq

    problems = []
    if not manifest.get("complete"):
        problems.append(f"{out}: the run is not complete (manifest complete=false); rerun `rpt-data tag` to finish it")
    listed = [s["file"] for s in manifest.get("shards", [])]
    on_disk = {os.path.relpath(p, out) for p in shard_paths(out)}  # as the manifest names them: data/NAME or NAME
    for extra in sorted(on_disk - set(listed)):
        problems.append(f"{extra}: shard file not listed in the manifest")
    if manifest.get("totals"):
        for k in ("rows", "positions", "scored", "selected"):
            total = sum(s[k] for s in manifest["shards"])
            if manifest["totals"][k] != total:
                problems.append(f"{MANIFEST}: totals say {manifest['totals'][k]} {k}, its shard entries add up to {total}")
    if manifest.get("world_size", 1) > 1:  # a merged run: its ranks' divisions give every unit to one rank
        problems += _division_problems(out, manifest["world_size"])
    metric = _metric_col(manifest)
    thr = manifest["config"]["select_above"]
    tokenizer = manifest.get("tokenizer") or {}
    for entry in manifest.get("shards", []):
        path = os.path.join(out, entry["file"])
        if entry["file"] not in on_disk:
            problems.append(f"{entry['file']}: listed in the manifest but missing")
            continue
        if "sha256" in entry and file_digest(path) != {"bytes": entry["bytes"], "sha256": entry["sha256"]}:
            problems.append(f"{entry['file']}: its bytes differ from the ones the manifest recorded "
                            "(modified, truncated or copied from another run)")
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for damaged files
            problems.append(f"{entry['file']}: unreadable parquet ({type(e).__name__}: {e})")
            continue
        if not table.schema.equals(SHARD_SCHEMA, check_metadata=False):
            problems.append(f"{entry['file']}: schema differs from the shard schema ({_schema_diff(table.schema)})")
            continue
        problems += [f"{entry['file']}: {p}" for p in footer_problems(table.schema.metadata, manifest)]
        df = pl.from_arrow(table)
        problems += [f"{entry['file']}: {p}" for p in _check_rows(df, entry, metric, thr, tokenizer.get("vocab_size"))]
    return problems


def _division_problems(out: str, world: int) -> list[str]:
    """rpt_data.merge.check_division on the rank records beside a merged manifest (none left: nothing to check)."""
    from rpt_data.merge import check_division, read_rank_records

    try:
        records = read_rank_records(Path(out))
        if sorted(records) == list(range(world)):
            check_division(records, world)
    except UserError as e:
        return [f"{MANIFEST}: {e}"]
    return []


def _schema_diff(schema) -> str:
    want = {f.name: f.type for f in SHARD_SCHEMA}
    got = {f.name: f.type for f in schema}
    diff = [f"no column '{n}'" for n in want if n not in got]
    diff += [f"column '{n}' is {got[n]}, expected {t}" for n, t in want.items() if n in got and got[n] != t]
    diff += [f"unexpected column '{n}'" for n in got if n not in want]
    return "; ".join(diff) or "nullability or column order differs"


def _check_rows(df: pl.DataFrame, entry: dict, metric: str, thr: float, vocab_size: int | None) -> list[str]:
    out = []
    n = pl.col("token_ids").list.len()
    if df.height != entry["rows"]:
        out.append(f"{df.height} rows, manifest says {entry['rows']}")
    if vocab_size:
        ids = pl.col("token_ids")
        foreign = df.filter((ids.list.max() >= vocab_size) | (ids.list.min() < 0)).height
        if foreign:
            out.append(f"{foreign} rows hold token ids outside the manifest tokenizer's vocabulary [0, {vocab_size}): "
                       "they were written with another tokenizer")
    bad_len = df.filter(pl.any_horizontal(pl.col(c).list.len() != n for c in
                                          ("token_bytes", "entropy", "topk_entropy", "target_logprob", "proxy_argmax")))
    if bad_len.height:
        out.append(f"{bad_len.height} rows whose per-position lists differ in length from token_ids")
        return out
    positions = df.select(n.sum()).item()
    if positions != entry["positions"]:
        out.append(f"{positions} positions, manifest says {entry['positions']}")
    ends_ok = df.select(
        ok=(pl.col("token_bytes").list.diff(null_behavior="drop").list.min().fill_null(0) >= 0)
        & (pl.col("token_bytes").list.last() == pl.col("text").str.len_bytes())
    )["ok"]
    if not ends_ok.all():
        out.append(f"{(~ends_ok).sum()} rows whose token_bytes are not increasing or do not end at the text's length")
    exploded = df.select("score_start", pl.col(metric).alias("m"), pos=pl.int_ranges(0, n)).explode("m", "pos")
    early = exploded.filter((pl.col("pos") < pl.col("score_start")) & pl.col("m").is_not_null()).height
    if early:
        out.append(f"{early} positions before score_start carry stats (they must be null)")
    scored = exploded.filter(pl.col("pos") >= pl.col("score_start")).height
    if scored != entry["scored"]:
        out.append(f"{scored} scored positions, manifest says {entry['scored']}")
    sel = df.select("score_start", "selected", pl.col(metric).alias("m"), len=n).explode("selected").drop_nulls("selected")
    sel = sel.with_columns(v=pl.col("m").list.get(pl.col("selected"), null_on_oob=True))
    wrong = sel.filter((pl.col("selected") < pl.col("score_start")) | (pl.col("selected") >= pl.col("len"))
                       | pl.col("v").is_null() | (pl.col("v") <= thr)).height
    if wrong:
        out.append(f"{wrong} selected positions are out of range or not above the threshold {thr}")
    if sel.height != entry["selected"]:
        out.append(f"{sel.height} selected positions, manifest says {entry['selected']}")
    return out
