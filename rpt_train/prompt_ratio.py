"""Policy tokens per proxy token of the shards' rows (issue 36): the shards' window is counted in the proxy
tokenizer's tokens, a policy with another tokenizer may need more for the same text. Estimated from a bounded
sample of rows (a few row groups spread over the shards), never the whole corpus."""
from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rpt_common.errors import UserError
from rpt_common.shards import read_manifest, shard_paths

SAMPLE_ROWS = 256  # rows tokenized by the policy tokenizer, at most
SAMPLE_FILES = 8  # shards the sample is spread over, at most


def sample_rows(shards: str, limit: int = SAMPLE_ROWS) -> list[tuple[str, int]]:
    """(text, proxy tokens) of up to `limit` rows: the first row groups of up to SAMPLE_FILES shards spread evenly
    over the directory's shards."""
    paths = shard_paths(shards)
    if not paths:
        return []
    files = [paths[i * len(paths) // min(SAMPLE_FILES, len(paths))] for i in range(min(SAMPLE_FILES, len(paths)))]
    per_file = -(-limit // len(files))
    rows = []
    for path in files:
        try:
            f = pq.ParquetFile(path)
            taken = 0
            for g in range(f.metadata.num_row_groups):
                if taken >= per_file or len(rows) >= limit:
                    break
                t = f.read_row_group(g, columns=["text", "token_ids"]).slice(0, per_file - taken)
                counts = pc.list_value_length(t.column("token_ids")).to_pylist()
                rows += [(s, n) for s, n in zip(t.column("text").to_pylist(), counts) if n]
                taken += t.num_rows
        except (pa.ArrowException, OSError, KeyError) as e:
            raise UserError(f"shard '{path}' cannot be read to compare tokenizers ({str(e).splitlines()[0]}); "
                            "`rpt-data validate` checks the directory")
    return rows[:limit]


@functools.lru_cache(maxsize=8)
def policy_token_ratio(model: str, shards: str) -> tuple[float, int, str]:
    """(worst policy/proxy tokens ratio over the sampled rows, rows sampled, warning): (1.0, 0, "") when the policy's
    tokenizer is the shards' proxy tokenizer (same vocabulary hash) or the manifest does not record one; (1.0, 0,
    warning) when the policy's tokenizer cannot be loaded."""
    from rpt_common.models import load_tokenizer, tokenizer_identity
    from rpt_train.policy import resolve_policy

    proxy = (read_manifest(shards).get("tokenizer") or {}).get("vocab_hash")
    if not proxy:
        return 1.0, 0, ""
    try:
        tok = load_tokenizer(resolve_policy(model))
    except UserError as e:
        return 1.0, 0, (f"warning: cannot load the policy's tokenizer to compare it with the shards' proxy tokenizer "
                        f"({e}); the bound assumes the same tokens per text, pass --max-context-tokens if it splits "
                        "text finer")
    if tokenizer_identity(tok)["vocab_hash"] == proxy:
        return 1.0, 0, ""
    rows = sample_rows(shards)
    if not rows:
        return 1.0, 0, ""
    counts = tok([text for text, _ in rows], add_special_tokens=False)["input_ids"]
    return max(len(ids) / n for ids, (_, n) in zip(counts, rows)), len(rows), ""
