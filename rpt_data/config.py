"""`rpt-data tag` configuration: one typed dataclass, the single source of defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rpt_common.errors import UserError

FORMATS = ("jsonl", "parquet", "text", "hf")
MODES = ("structured", "continuous")
METRICS = ("topk", "full")
# Knobs that do not change the shards: changing them between a run and its resume is allowed.
# on_bad_record: a `fail` run stops at the first bad record, so its shards are a prefix of a `skip` run's.
# row_group_rows: only the Parquet layout; each shard's manifest entry records the size it was written with.
# device, dtype: compared as what they resolve to (the manifest's `precision`: device type, dtype, TF32), so
# `auto` resumed on another kind of machine is refused, and `auto` vs the dtype it meant is not.
RUNTIME_ONLY = ("overwrite", "batch_tokens", "chunk_rows", "progress", "on_bad_record", "row_group_rows", "device",
                "dtype")


STUDIED_PREFIX = 256  # the context prefix measured for 1024-token windows: results/context-prefix.md


def default_context_prefix(window: int) -> int:
    """A quarter of the window, at most the studied 256 tokens (so always smaller than the window)."""
    return min(STUDIED_PREFIX, max(window, 0) // 4)


@dataclass(kw_only=True, slots=True)
class TagConfig:
    inputs: list[str] = field(default_factory=list)  # files, directories or globs
    format: str | None = None  # inferred from the extension when None
    text_field: str | None = None  # default "text" when no template is given
    template: str | None = None  # e.g. "{problem}\n\n{solution}"
    id_field: str | None = None  # default: "<file>:<line>"
    mode: str = "structured"
    separator: str = "\n\n"  # joins records of one file into a continuous stream
    model: str = "demo"
    window: int = 1024  # tokens per window, context prefix included
    context_prefix: int | None = None  # context-only overlap (tokens); None: default_context_prefix(window)
    top_k: int = 16
    metric: str = "topk"  # which entropy `selected` and buckets use: topk_entropy or entropy
    select_above: float = 0.5  # nats
    buckets: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    batch_tokens: int = 16384  # padded tokens per forward pass
    chunk_rows: int | None = None  # rows per lm_head chunk (None: 2048 on GPU, ~64 MiB of logits on CPU)
    device: str = "auto"
    dtype: str = "auto"
    out: str | None = None
    shard_rows: int = 1024  # windows per shard
    row_group_rows: int = 32  # windows per Parquet row group: what one training sample reads (rpt_common.shards)
    overwrite: bool = False
    on_bad_record: str = "skip"
    limit: int | None = None  # good records to read
    rank: int = 0  # this process's part of the input; see rpt_data.ranks for the env defaults
    world_size: int = 1  # > 1: each rank writes its own shards, then `rpt-data merge` (or torchrun rank 0)
    progress: bool = True

    def __post_init__(self):
        # a list, whatever came in (str, or click's tuple): resume compares it with the manifest's list
        self.inputs = [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)
        if isinstance(self.buckets, str):
            self.buckets = [float(x) for x in self.buckets.split(",") if x.strip()]
        self.buckets = sorted(float(x) for x in self.buckets)
        checks = [
            (bool(self.inputs), "no input given: use --input PATH (repeatable) or `inputs:` in the recipe"),
            (self.out is not None, "no output directory given: use --out DIR"),
            (self.format is None or self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}"),
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)}"),
            (self.metric in METRICS, f"--metric must be one of {', '.join(METRICS)}"),
            (self.on_bad_record in ("skip", "fail"), "--on-bad-record must be skip or fail"),
            (self.window >= 2, "--window must be at least 2 tokens"),
            (self.context_prefix is None or 0 <= self.context_prefix < self.window,
             f"--context-prefix must be >= 0 and smaller than --window ({self.window}); leave it out for the "
             f"default, {default_context_prefix(self.window)} for this window"),
            (self.top_k >= 1, "--top-k must be >= 1"),
            (self.batch_tokens >= 1 and self.shard_rows >= 1, "--batch-tokens and --shard-rows must be >= 1"),
            (self.row_group_rows >= 1, "--row-group-rows must be >= 1"),
            (self.limit is None or self.limit >= 0, "--limit must be >= 0"),
            (0 <= self.rank < self.world_size, "--rank must be in [0, --world-size)"),
            (not (self.text_field and self.template), "give --text-field or --template, not both"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        if self.context_prefix is None:
            self.context_prefix = default_context_prefix(self.window)
        if self.template is None and self.text_field is None:
            self.text_field = "text"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def content_dict(self) -> dict:
        """The settings that determine the output's content (compared on resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}

    def bucket_names(self) -> list[str]:
        if len(self.buckets) == 3:
            return ["easy", "medium", "hard"]
        return [f"gt_{b:g}" for b in self.buckets]
