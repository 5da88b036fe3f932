"""`rpt-data`: tag a corpus with proxy-model entropy, inspect and validate the shards."""
from __future__ import annotations

import re
import sys

import click

from rpt_common.errors import user_errors
from rpt_common.recipe import build_config, load_recipe

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}  # what `--template "{a}\n\n{b}"` means as typed in a shell


def unescape(ctx, param, value: str | None) -> str | None:
    """\\n, \\t and \\\\ typed in an option value -> newline, tab, backslash (other backslashes stay as typed)."""
    return None if value is None else re.sub(r"\\[nt\\]", lambda m: ESCAPES[m.group()], value)


def proxy_options(fn):
    """The proxy-model options `tag` and `prefix-study` share: one declaration, one help text."""
    options = [
        click.option("--model",
                     help="Proxy model: HF directory, .gguf file, or 'demo' (SmolLM2-135M-Instruct). [demo]"),
        click.option("--top-k", type=int, help="k of the top-k entropy. [16]"),
        click.option("--metric", type=click.Choice(["topk", "full"]), help="Entropy used for tags and buckets. [topk]"),
        click.option("--select-above", type=float, help="Tag positions whose entropy exceeds this (nats). [0.5]"),
        click.option("--buckets", help="Comma-separated bucket thresholds in nats (easy,medium,hard). [0.5,1.0,1.5]"),
        click.option("--batch-tokens", type=int, help="Padded tokens per forward pass. [16384]"),
        click.option("--device", help="auto, cpu or cuda[:N]. [auto]"),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Model dtype; auto = bf16 on GPU, fp32 on CPU. [auto]"),
    ]
    for option in reversed(options):  # click lists options in decorator order, top to bottom
        fn = option(fn)
    return fn


@click.group(context_settings=CTX)
def main():
    """Reinforcement Pre-Training data tools: entropy-tag a corpus into Parquet shards."""


@main.command(context_settings=CTX)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--input", "inputs", multiple=True, help="Input file, directory or glob (repeatable). A directory is walked for .jsonl, .jsonl.gz, .parquet, .txt and .md files; README files beside .jsonl/.parquet data are named in a warning.")
@click.option("--format", type=click.Choice(["jsonl", "parquet", "text", "hf"]),
              help="Input format; inferred from the extension when omitted (hf = datasets.save_to_disk dir).")
@click.option("--text-field", help="Field holding the text (default: text).")
@click.option("--template", callback=unescape,
              help='Python format string over record fields, e.g. "{problem}\\n\\n{solution}" '
                   '(\\n, \\t and \\\\ are read as newline, tab and backslash).')
@click.option("--id-field", help="Field holding a stable document id (default: <file>:<line>).")
@click.option("--mode", type=click.Choice(["structured", "continuous"]),
              help="structured: each record its own stream; continuous: each file one stream. [structured]")
@click.option("--separator", callback=unescape,
              help="Text between records of one file in continuous mode (\\n, \\t, \\\\ as in --template). [\\n\\n]")
@click.option("--window", type=int, help="Tokens per window, context prefix included. [1024]")
@click.option("--context-prefix", type=int,
              help="Context-only tokens repeated at the start of each later window of a stream. "
                   "[a quarter of --window, at most 256: 256 for 1024]")
@proxy_options
@click.option("--chunk-rows", type=int, help="Rows per lm_head chunk (default: 2048 on GPU, ~64 MiB of logits on CPU).")
@click.option("--out", help="Output directory for shards, manifest.json and rejects.jsonl.")
@click.option("--shard-rows", type=int, help="Windows per Parquet shard. [1024]")
@click.option("--row-group-rows", type=int,
              help="Windows per Parquet row group, the unit one training sample reads (recorded per shard). [32]")
@click.option("--overwrite/--resume", default=None, help="Start over instead of resuming a stopped run. [--resume]")
@click.option("--on-bad-record", type=click.Choice(["skip", "fail"]),
              help="skip: log to rejects.jsonl and go on; fail: exit 2 naming file and line. [skip]")
@click.option("--limit", type=int, help="Read at most N good records.")
@click.option("--rank", type=int,
              help="This process's rank, with --world-size. Default: torchrun's $RANK, else a Slurm array's "
                   "$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else $SLURM_PROCID, else 0.")
@click.option("--world-size", type=int,
              help="Number of ranks; each tags its part of the input into its own shards. Default: $WORLD_SIZE, "
                   "else $SLURM_ARRAY_TASK_COUNT, else $SLURM_NTASKS, else 1. Independent ranks (Slurm array, "
                   "explicit flags) end with `rpt-data merge OUT`; under torchrun rank 0 writes the manifest.")
@click.option("--progress/--no-progress", default=None, help="Show a progress line on stderr. [on]")
@user_errors
def tag(recipe, **opts):
    """Tag high-entropy positions of a corpus with a proxy model (RECIPE.yaml optional)."""
    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag
    from rpt_data.ranks import resolve_ranks

    rec = load_recipe(recipe, section="tag")
    if "input" in rec:
        rec["inputs"] = rec.pop("input")
    given = {k: opts[k] if opts[k] is not None else rec.get(k) for k in ("rank", "world_size")}
    ranks = resolve_ranks(given["rank"], given["world_size"])
    opts.update(rank=ranks.rank, world_size=ranks.world_size)
    cfg = build_config(TagConfig, rec, opts, source=recipe or "options")
    _quiet_transformers()
    try:
        run_tag(cfg, ranks=ranks)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: '{cfg.out}' keeps every complete shard; rerun the same command to resume "
                   "after them (--overwrite starts over)", err=True)
        sys.exit(130)


@main.command(context_settings=CTX)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), help="Write entropy histograms (with bucket thresholds) to this PNG.")
@click.option("--top", type=int, default=5, show_default=True, help="Show the N hardest positions with their context.")
@click.option("--html", type=click.Path(dir_okay=False),
              help="Also write a self-contained page (no network) with the text of a sample of documents, every "
                   "scored token shaded by --metric, selected positions underlined, statistics on hover or focus.")
@click.option("--docs", type=int, help="With --html: documents on the page. [20]")
@click.option("--pick", type=click.Choice(["hardest", "random"]),
              help="With --html: the documents of highest mean metric, or a seeded random sample. [hardest]")
@click.option("--seed", type=int, help="With --html --pick random: the sample's seed. [0]")
@click.option("--metric", type=click.Choice(["topk", "full", "surprisal"]),
              help="With --html: shade by top-k entropy, full entropy or surprisal (-target log-prob), nats. "
                   "[the run's tag metric]")
@click.option("--doc-tokens", type=int,
              help="With --html: at most this many scored tokens per document, in whole windows (at least one): a "
                   "contiguous run around the hardest window, or from a random one; bounds the page size. [2000]")
@click.option("--compare", type=click.Path(file_okay=False),
              help="With --html: a second output over the same text with the same tokenizer (another context "
                   "prefix or proxy): shade by the per-token difference OTHER - OUT and mark flipped selections.")
@user_errors
def inspect(out, plot, top, html, docs, pick, seed, metric, doc_tokens, compare):
    """Summarise a tag output directory with polars (and, with --html, a token heatmap page)."""
    from rpt_data.inspect import inspect_out

    page = {"docs": docs, "pick": pick, "seed": seed, "metric": metric, "doc_tokens": doc_tokens, "compare": compare}
    if html is None and any(v is not None for v in page.values()):
        raise click.UsageError(f"--{next(k for k, v in page.items() if v is not None).replace('_', '-')} needs --html FILE")
    inspect_out(out, plot=plot, top=top)
    if html:
        from rpt_data.view import write_html

        got = write_html(out, html, **{k: v for k, v in page.items() if v is not None})
        click.echo(f"page written to {html}: {got['docs']} documents, {got['tokens']:,} tokens, "
                   f"{got['bytes'] / 1e6:.1f} MB")


@main.command(context_settings=CTX)
@click.argument("out", type=click.Path(file_okay=False))
@user_errors
def merge(out):
    """Write OUT/manifest.json for a multi-rank `tag` run once every rank is done.

    Refuses (exit 2, naming the rank or shard) unless ranks 0..W-1 are all complete, ran with the same
    options, inputs and model, and every recorded shard is on disk with its recorded size. The ranks'
    rejects-RRRRR.jsonl are merged into OUT/rejects.jsonl. Under torchrun rank 0 does this itself; run it
    after a Slurm job array or independent `--rank/--world-size` processes (e.g. as a dependent job).
    Safe to repeat.
    """
    from rpt_data.merge import merge_out

    m = merge_out(out)
    click.echo(f"{out}: merged {m['world_size']} ranks: {len(m['shards'])} shards, {m['totals']['rows']:,} windows, "
               f"{m['records']:,} records, {m['bad_records']:,} bad records (rejects.jsonl)")


@main.command(context_settings=CTX)
@click.argument("out", type=click.Path(file_okay=False))
@user_errors
def validate(out):
    """Check every shard against the manifest and the schema; exit 1 on any mismatch."""
    import sys

    from rpt_data.inspect import validate_out

    problems = validate_out(out)
    for p in problems:
        click.echo(f"invalid: {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{out}: ok")


@main.command("prefix-study", context_settings=CTX)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--input", "inputs", multiple=True, help="Continuous corpus: file, directory, glob or hf:// (repeatable).")
@click.option("--format", type=click.Choice(["jsonl", "parquet", "text", "hf"]), help="Input format (as for tag).")
@click.option("--text-field", help="Field holding the text (default: text).")
@click.option("--template", callback=unescape, help="Python format string over record fields (as for tag).")
@click.option("--separator", callback=unescape, help="Text between records of one file (as for tag). [\\n\\n]")
@click.option("--window", type=int, help="Production window in tokens, prefix included. [1024]")
@click.option("--prefixes", help="Comma-separated context prefixes to compare. [those of 0,16,32,64,128,256 below --window]")
@click.option("--reference-context", type=int, help="Real tokens of context before every reference position. [1024]")
@click.option("--tokens-per-stream", type=int, help="Sample: the first N tokens of every input file. [16384]")
@click.option("--tolerance", type=float,
              help="Recommend the smallest prefix whose first-16 tag disagreement is at most this share. [0.02]")
@proxy_options
@click.option("--out", help="Directory for prefix-study.json, .md and .png.")
@click.option("--note", help="Free text put at the top of the report (e.g. what the corpus is).")
@user_errors
def prefix_study(recipe, **opts):
    """Measure the windowing bias of each context prefix against a long-context reference (RECIPE.yaml optional)."""
    from rpt_data.study import StudyConfig, run_study

    rec = load_recipe(recipe, section="prefix_study")
    if "input" in rec:
        rec["inputs"] = rec.pop("input")
    cfg = build_config(StudyConfig, rec, opts, source=recipe or "options")
    _quiet_transformers()
    res = run_study(cfg)
    click.echo(f"recommended context prefix: {res['recommended_prefix']} ({res['recommendation_rule']}); "
               f"wrote {cfg.out}/prefix-study.json, .md, .png")


def _quiet_transformers():
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


if __name__ == "__main__":
    main()
