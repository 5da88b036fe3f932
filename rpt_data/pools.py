"""Batches sorted across a bounded look-ahead: whole shards are pooled, and the pool is cut into token-budget batches.

Sorting within one shard leaves a partial batch per length class in every shard (web text in 1,024-window shards:
~74% of a 16,384-token budget filled); a pool of ~8M tokens of windows fills ~95% on the same mix
(`bench/overlap.py`). A pool is a pure function of the window stream (whole shards, LOOKAHEAD_TOKENS), so the
batches, hence the stats, do not depend on threads or timing, and a resumed run rebuilds the same pools: it scores
again only the batches of the pool it stopped in that hold a window of a shard not yet written.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from rpt_data.proxy import WindowStats, token_budget_batches
from rpt_data.windows import Window

LOOKAHEAD_TOKENS = 8 << 20  # window tokens (at most) pooled for batching: what bounds the pool's memory (~30 B/token)

Pool = list[tuple[int, list[Window]]]  # (shard sequence number, its windows)


def pool_shards(shard_rows: int, window: int, lookahead_tokens: int | None = None) -> int:
    """Whole shards per pool: as many as hold at most `lookahead_tokens` (LOOKAHEAD_TOKENS) window tokens, >= 1."""
    tokens = LOOKAHEAD_TOKENS if lookahead_tokens is None else lookahead_tokens
    return max(1, tokens // max(1, shard_rows * window))


def shard_pools(windows: Iterator[Window], shard_rows: int, size: int) -> Iterator[Pool]:
    """The window stream cut into shards of `shard_rows` windows (numbered from 0), `size` shards per pool.
    When the stream fails (bad input with --on-bad-record fail), the shards completed before the failure still
    come, as a last, smaller pool, then the error: they are written, as a run without pools would have."""
    pool: Pool = []
    for seq in itertools.count():
        try:
            chunk = list(itertools.islice(windows, shard_rows))
        except Exception:
            if pool:
                yield pool
            raise
        if not chunk:
            break
        pool.append((seq, chunk))
        if len(pool) == size:
            yield pool
            pool = []
    if pool:
        yield pool


def score_pool(proxy, pool: Pool, done: int, batch_tokens: int,
               on_tokens: Callable[[int], None] | None = None) -> list[list[WindowStats | None]]:
    """Stats of every window of the pool's shards numbered >= `done` (None for the others), shard by shard.

    Batches come from `token_budget_batches` over the whole pool; a batch that holds only windows of done shards
    is skipped. With a proxy that has `launch`/`collect`, batch k + 1 is queued on the device before the stats of
    batch k are waited for, so the device never idles between two batches of a pool."""
    where = [(k, j) for k, (_, chunk) in enumerate(pool) for j in range(len(chunk))]
    flat = [pool[k][1][j] for k, j in where]
    todo = [pool[k][0] >= done for k, _ in where]
    stats: list[list[WindowStats | None]] = [[None] * len(chunk) for _, chunk in pool]
    launch = getattr(proxy, "launch", None)
    collect = getattr(proxy, "collect", None)
    if launch is None or collect is None:  # a stand-in with score_batch only
        launch, collect = proxy.score_batch, (lambda got: got)

    def finish(batch: list[int], handle) -> None:
        for i, st in zip(batch, collect(handle)):
            k, j = where[i]
            stats[k][j] = st
        if on_tokens is not None:
            on_tokens(sum(len(flat[i].token_ids) for i in batch))

    pending = None
    for batch in token_budget_batches(flat, batch_tokens):
        if not any(todo[i] for i in batch):
            continue
        handle = launch([flat[i] for i in batch])
        if pending is not None:
            finish(*pending)
        pending = (batch, handle)
    if pending is not None:
        finish(*pending)
    return stats
