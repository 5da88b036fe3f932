"""`rpt-train eval --baseline MODEL`: the policy and a baseline scored on the same positions, and their paired
differences per bucket and accuracy, with the interval and p-value the experiment reports use
(paired_by_position: positions clustered by their held-out split unit, as the report does)."""
from __future__ import annotations

from rpt_train.evaluate import EVAL_BUCKETS
from rpt_train.samples import split_unit

# accuracy -> its per-position outcome in an eval's `positions` records
OUTCOMES = {
    "ntr_accuracy": lambda r: float(r["correct"][0]),
    "ntr_greedy_accuracy": lambda r: float(r["greedy_correct"]),
    "ntr_pass_at_k": lambda r: float(any(r["correct"])),
    "ntp_accuracy": lambda r: float(r["ntp_correct"]),
}


def cluster_of(key: str, block_windows: int) -> str:
    """The cluster of a position (key doc_id/window_index/t) in a paired test: its held-out split unit, the document,
    or its block of `block_windows` windows on shards split by blocks (paired_by_position says why)."""
    doc_id, window, _ = key.rsplit("/", 2)  # key = doc_id/window_index/t; a doc_id may hold '/'
    return split_unit(doc_id, int(window), block_windows)


def paired_by_position(a: list[float], b: list[float], keys: list[str], block_windows: int | None,
                       alpha: float = 0.05, power: float = 0.8) -> dict:
    """rpt_train.stats.paired_difference of the outcomes a - b of the positions `keys`, clustered by held-out split
    unit (cluster_of; `block_windows`: the split's, from the eval's meta; None or 0: by document). The one rule of
    `rpt-train eval --baseline` and of the experiment report.

    Why the split unit. The design effect is estimated from the spread between clusters (one-way ANOVA ICC), so
    the clusters must be independent draws, and there must be several. The held-out positions are a sample of
    split units: the split draws each unit (a document; on continuous shards a block of windows of a stream)
    independently by a seeded hash, and the eval draws positions inside the drawn units. Those units are the
    sampled clusters of the design. On structured shards the unit is the document: both rules agree. On
    continuous shards split by blocks a document is a whole stream (one per file): few, often one; clustered by
    document the ICC is undefined with one cluster (taken as 0: design effect 1, positions as if independent) and
    noise with a few, so the interval is far too narrow (a block-level effect ignored). Clustered by block, the
    positions of one block (16 consecutive windows by default: shared topic and text) correlate and count once;
    blocks of one stream may still correlate with each other (topic drift), which this ignores: the interval is
    about the text of these streams, the population the split sampled its blocks from, not about other streams."""
    from rpt_train.stats import paired_difference

    return paired_difference(a, b, [cluster_of(k, block_windows or 0) for k in keys], alpha, power)


def compare(policy: dict, baseline: dict, block_windows: int = 0) -> dict:
    """{bucket: {accuracy: paired_difference(policy - baseline)}} over the positions both evaluated with details
    (their `chosen` keys must agree: the same positions)."""
    if policy["chosen"] != baseline["chosen"]:
        raise ValueError("compare: the two evaluations scored different positions")
    a = {r["key"]: r for r in policy["positions"]}
    b = {r["key"]: r for r in baseline["positions"]}
    out = {}
    for bucket in EVAL_BUCKETS:
        keys = policy["chosen"][bucket]
        out[bucket] = {name: paired_by_position([f(a[k]) for k in keys], [f(b[k]) for k in keys], keys,
                                                block_windows) for name, f in OUTCOMES.items()}
    return out


def print_comparison(comparison: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("bucket", "accuracy", "n", "difference", "95% interval", "p"):
        table.add_column(col, justify="left" if col in ("bucket", "accuracy") else "right")
    for bucket in EVAL_BUCKETS:
        for name, d in comparison[bucket].items():
            if d["diff"] is None:
                table.add_row(bucket, name, str(d["n"]), "-", "-", "-")
                continue
            table.add_row(bucket, name, str(d["n"]), f"{d['diff']:+.3f}", f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]",
                          f"{d['p_value']:.3g}")
    Console().print(table)


def tokenizer_fingerprint(tokenizer) -> dict:
    """What fixes a tokenizer's boundaries: rpt_common's identity (the vocabulary hash the manifests record, less
    the name) and a hash of its segmentation rules (normalizer, pre-tokenizer, model: merges too), not padding."""
    import hashlib
    import json

    from rpt_common.models import tokenizer_identity

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    rules = json.dumps([backend.get(k) for k in ("normalizer", "pre_tokenizer", "model")], sort_keys=True)
    ident = {k: v for k, v in tokenizer_identity(tokenizer).items() if k != "name"}
    return ident | {"rules_hash": hashlib.sha256(rules.encode()).hexdigest()[:16]}


def check_tokenizers(model: str, baseline: str) -> None:
    """Refuse a --baseline whose tokenizer is not the model's: the positions, context cuts and label boundaries
    come from the model's tokenizer, so a baseline with another one would be judged against boundaries not its own."""
    from rpt_common.errors import UserError
    from rpt_train.policy import load_policy

    # the tokenizers and the models' skeletons on the meta device (no weights read): before an hour of scoring
    a, b = (tokenizer_fingerprint(load_policy(s, "cpu", "float32", weights=False).tokenizer) for s in (model, baseline))
    if a != b:
        what = "vocabulary" if a["vocab_hash"] != b["vocab_hash"] else "segmentation rules (merges, pre-tokenizer)"
        raise UserError(f"--baseline '{baseline}' has another tokenizer than '{model}' (its {what} differ), so it "
                        "would be scored against label boundaries cut by the model's tokenizer; compare models that "
                        "share one tokenizer")


def _score(cfg, spec: str, device: str, shards, chosen):
    """Evaluate one model (loaded on this rank's device) on `chosen` positions (None: select them with its
    tokenizer; `shards` None: open cfg.shards once the model is loaded). Returns (result with details, the
    positions, the ShardSet)."""
    from rpt_common.models import enable_tf32
    from rpt_common.progress import CountProgress
    from rpt_train import distributed
    from rpt_train.budget import eval_rule
    from rpt_train.evaluate import evaluate, select_positions
    from rpt_train.policy import eos_ids, load_policy
    from rpt_train.rollout import HFRollout, autocast_bf16
    from rpt_train.samples import ShardSet

    policy = load_policy(spec, device, cfg.dtype)
    shards = shards if shards is not None else ShardSet(cfg.shards)
    engine = HFRollout(policy.model, policy.tokenizer, eos_ids(policy), cfg.rollout_batch_size,
                       static_cache=cfg.static_cache)
    if chosen is None:
        chosen = select_positions(shards, policy.tokenizer, cfg)
    where = next(policy.model.parameters()).device
    enable_tf32(where)
    with autocast_bf16(where):  # bf16 on CUDA (rollouts and the greedy next-token pass), nothing on CPU
        label = f"eval {spec} ({cfg.samples}+1 completions {eval_rule(cfg)})"
        with CountProgress(label, "positions", enabled=distributed.is_main()) as progress:
            result = evaluate(policy.model, policy.tokenizer, engine, cfg, shards, chosen, details=True,
                              progress=progress)
    result["meta"]["model"] = policy.path
    return result, chosen, shards


def run_eval(cfg) -> dict | None:
    """`rpt-train eval`: one process, or every rank of torchrun scoring its stripe of the positions (a replica of
    the model per rank). With --baseline the baseline is scored on the same positions and compared. Returns the
    result on rank 0 (None elsewhere)."""
    from rpt_train import distributed
    from rpt_train.evaluate import print_table
    from rpt_train.trainer import seed_everything

    if cfg.baseline:
        check_tokenizers(cfg.model, cfg.baseline)
    device = distributed.init_from_env(cfg.device)
    main = distributed.is_main()
    try:
        seed_everything(cfg.seed)
        result, chosen, shards = _score(cfg, cfg.model, device, None, None)
        if cfg.baseline:
            base, _, _ = _score(cfg, cfg.baseline, device, shards, chosen)
            result["comparison"] = compare(result, base, cfg.split_block_windows)
            result["baseline"] = {k: v for k, v in base.items() if k != "chosen"}
        for r in (result, result.get("baseline", {})):  # per-position outcomes stay, their completions do not
            for rec in r.get("positions", []):
                rec.pop("completions", None)
                rec.pop("greedy_completion", None)
        distributed.barrier()  # ranks leave together, gloo's last tensor freed (the exit itself: end_process)
    finally:
        distributed.shutdown()
    if not main:
        return None
    print_table(result, title=f"next-token reasoning: {cfg.model} on {cfg.shards}")
    if cfg.baseline:
        print_table(result["baseline"], title=f"baseline: {cfg.baseline}")
        print_comparison(result["comparison"], title=f"{cfg.model} - {cfg.baseline} (paired, same positions)")
    return result
