"""Next-token-reasoning evaluation per entropy bucket: ntr_accuracy (first sample), ntr_greedy_accuracy (temperature
0), ntr_pass_at_k (any of K), answer_rate, and ntp_accuracy (the same model's greedy next token on the raw context,
scored by prefix match); each accuracy with its Wilson 95% interval."""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rpt_common.bos import encode_with_bos
from rpt_common.errors import UserError
from rpt_common.shards import shards_identity
from rpt_train import distributed
from rpt_train.candidates import Candidates, TableSink, shuffled
from rpt_train.decoding import decode_batch_after
from rpt_train.rundir import read_provenance
from rpt_train.reward import extract_answer, prefix_match
from rpt_train.rollout import SamplingParams
from rpt_train.samples import (BUCKET_NAMES, Sample, SampleBuilder, ShardSet, resolve_shard_defaults,
                               split_candidates)
from rpt_train.stats import wilson
from rpt_train.templates import PromptBuilder

EVAL_BUCKETS = BUCKET_NAMES + ("all",)
FIELDS = ("n", "ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "answer_rate", "ntp_accuracy",
          "completion_length")
ACCURACIES = ("ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "ntp_accuracy")  # each gets a Wilson `_ci`
# multi-token prediction: over every right sampled answer of the bucket (all K samples of each position)
MTP_FIELDS = ("right_answers", "right_tokens_mean", "right_bytes_mean", "multi_token_share")


@dataclass(kw_only=True, slots=True)
class Scored:
    """Per-position outcome."""

    sample: Sample
    correct: list[bool]  # one per sample
    answered: list[bool]
    lengths: list[int]
    ntp_correct: bool
    completions: list[str]
    greedy_correct: bool  # the temperature-0 completion's answer
    greedy_completion: str
    right_tokens: list[int] = field(default_factory=list)  # per sample: label tokens a right answer covers, 0 = wrong


def matched_tokens(answer: str | None, label_tokens: list[str]) -> int:
    """How many label tokens a prefix-matching answer covers (the j of `prefix_match`); 0 when it does not match."""
    if not answer:
        return 0
    want, acc = answer.encode(), b""
    for j, t in enumerate(label_tokens, 1):
        acc += t.encode() if isinstance(t, str) else t
        if acc == want:
            return j
        if len(acc) >= len(want):
            return 0
    return 0


def eval_split(cfg) -> str:
    return cfg.split if cfg.split != "auto" else ("heldout" if cfg.heldout_fraction > 0 else "all")


def select_positions(shards: ShardSet, tokenizer, cfg) -> dict[str, list[Sample]]:
    """Up to `cfg.limit` usable positions per bucket (easy/medium/hard nested above the thresholds, plus all),
    each bucket the first qualifying positions of one seeded permutation, so buckets share positions. The table and
    the permutation are memory-mapped and walked a block at a time (pick): the heap holds O(windows + limit), the
    same on every rank, and every rank picks the same positions."""
    resolve_shard_defaults(cfg, shards)
    split = eval_split(cfg)
    if split == "all" and cfg.split == "auto" and read_provenance(cfg.model) is not None:
        distributed.warn(f"'{cfg.model}' is a training run that held out no documents: its eval scores documents it "
                         "trained on")
    cands = split_candidates(shards, cfg, split)  # memory-mapped, a row group at a time: bounded on every rank
    if len(cands) == 0:
        raise UserError(f"no scored position in the '{split}' documents of '{cfg.shards}'; "
                        "check --split / --heldout-fraction")
    build = SampleBuilder(shards, cands, tokenizer, labels_length=cfg.labels_length,
                          max_context_tokens=cfg.max_context_tokens, thresholds=cfg.bucket_thresholds,
                          answer_format=cfg.answer_format)
    # np.random.default_rng([seed, 0xE5A1]).permutation(N), memory-mapped: 4 bytes a position in the page cache
    order = shuffled(len(cands), [cfg.seed, 0xE5A1], TableSink.scratch_dir())
    return pick(cands, order, build, cfg.limit, cfg.bucket_thresholds)


ORDER_BLOCK = 1 << 16  # positions of the order whose entropies one step of pick's walk gathers


def along(cands: Candidates, order: np.ndarray, cut: float, block: int = ORDER_BLOCK):
    """The candidate indices of `order`, in order, whose entropy is above `cut`, read a block of the order at a
    time (the heap holds a block, never an N-sized array)."""
    for start in range(0, len(order), block):
        o = np.asarray(order[start:start + block])
        for i in o[cands.value[o] > np.float64(cut)]:  # as Candidates.above (a Python float: the table's dtype)
            yield int(i)


def pick(cands: Candidates, order: np.ndarray, build, limit: int, thresholds: list[float]) -> dict[str, list]:
    """Per bucket of EVAL_BUCKETS, the first `limit` candidates along `order` above its threshold that `build(i)`
    makes a Sample of (None: unusable); each candidate is built once, so buckets share positions."""
    built: dict[int, Sample | None] = {}
    chosen = {}
    for b in EVAL_BUCKETS:
        th = -np.inf if b == "all" else thresholds[BUCKET_NAMES.index(b)]
        picked = []
        for i in along(cands, order, th):
            if len(picked) == limit:
                break
            if i not in built:
                built[i] = build(i)
            if built[i] is not None:
                picked.append(built[i])
        chosen[b] = picked
    return chosen


@torch.no_grad()
def greedy_next_tokens(model, tokenizer, contexts: list[str], batch_size: int = 16) -> list[str]:
    """The model's greedy next token after each raw context, decoded as it reads after the context. The context is encoded as the tagger fed
    its proxy (rpt_common.bos: BOS if the tokenizer adds one, never an EOS), left-padded."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(contexts), batch_size):
        rows = encode_with_bos(tokenizer, contexts[i:i + batch_size])
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=1).logits[:, -1]
        # read after the context's last tokens: decoded alone, a SentencePiece token drops its leading space
        out += decode_batch_after(tokenizer, rows, [[int(t)] for t in logits.argmax(-1)])
    return out


def eval_chunks(samples: list[Sample], cfg) -> list[tuple[int, list[Sample]]]:
    """The positions in numbered chunks of one generate call each (--rollout-batch-size / --samples positions)."""
    per_call = max(1, (cfg.rollout_batch_size or 32) // cfg.samples)
    return list(enumerate(samples[i:i + per_call] for i in range(0, len(samples), per_call)))


def chunk_seed(seed: int, chunk: int) -> int:
    """The RNG seed of chunk `chunk`: a chunk draws the same completions whichever rank scores it."""
    return int(np.random.SeedSequence([seed, 0xE7A1, chunk]).generate_state(1)[0])


def score_positions(model, tokenizer, engine, samples: list[Sample], cfg, progress=None,
                    chunks: list[tuple[int, list[Sample]]] | None = None) -> list[Scored]:
    """K sampled completions, one greedy (temperature 0) completion and one greedy next token per position, a
    chunk (eval_chunks; `chunks` replaces `samples` when given) at a time, each seeded by its number;
    `progress(done, total)`, when given, is called before the first and after every chunk of positions."""
    prompts = PromptBuilder(tokenizer, cfg.template, cfg.chat_template, cfg.response_prefix)
    new = cfg.max_new_tokens
    if getattr(cfg, "think_overflow", "fail") == "close":  # as the run trained: budget forcing (rpt_train/overflow.py)
        from rpt_train.budget import think_close
        from rpt_train.overflow import ForcedClose

        engine = ForcedClose(engine, tokenizer, think_close(cfg), cfg.think_budget, cfg.answer_room,
                             cfg.answer_format)
        new = cfg.think_budget + cfg.answer_room
    params = SamplingParams(n=cfg.samples, max_new_tokens=new, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
    greedy_params = SamplingParams(n=1, max_new_tokens=new, greedy=True)  # argmax: draws no RNG
    chunks = eval_chunks(samples, cfg) if chunks is None else chunks
    total = sum(len(chunk) for _, chunk in chunks)
    if progress:
        progress(0, total)
    scored = []
    for c, chunk in chunks:
        torch.manual_seed(chunk_seed(cfg.seed, c))
        # one forward per chunk: every rank runs as many as the others (FSDP's all-gathers)
        greedy = greedy_next_tokens(model, tokenizer, [s.context for s in chunk], batch_size=len(chunk))
        ids = [prompts.ids(s.context) for s in chunk]
        batch = engine.generate(ids, params)
        lengths = batch.lengths.tolist()
        greedy_texts = [prompts.completion(t) for t in engine.generate(ids, greedy_params).texts]
        for j, s in enumerate(chunk):
            texts = [prompts.completion(t) for t in batch.texts[j * cfg.samples:(j + 1) * cfg.samples]]
            answers = [extract_answer(t, cfg.answer_format) for t in texts]
            scored.append(Scored(sample=s, correct=[prefix_match(a, s.label_tokens) for a in answers],
                                 answered=[a is not None for a in answers],
                                 lengths=lengths[j * cfg.samples:(j + 1) * cfg.samples],
                                 ntp_correct=prefix_match(greedy[j], s.label_tokens), completions=texts,
                                 greedy_correct=prefix_match(extract_answer(greedy_texts[j], cfg.answer_format),
                                                             s.label_tokens),
                                 greedy_completion=greedy_texts[j],
                                 right_tokens=[matched_tokens(a, s.label_tokens) for a in answers]))
        if progress:
            progress(len(scored), total)
    return scored


def score_shared(model, tokenizer, engine, samples: list[Sample], cfg, progress=None) -> list[Scored]:
    """score_positions with the chunks of positions striped over the ranks (rank r takes chunks r, r + W, ...) and
    gathered back in order: each chunk is seeded by its number, so W ranks score exactly what one process does.
    A rank with fewer chunks also scores a copy of the first (discarded): every rank runs the same forwards,
    which FSDP's all-gathers need."""
    world, rank = distributed.world_size(), distributed.rank()
    chunks = eval_chunks(samples, cfg)
    if world == 1:
        return score_positions(model, tokenizer, engine, samples, cfg, progress, chunks)
    mine = chunks[rank::world]
    padded = mine + chunks[:1] * (-(-len(chunks) // world) - len(mine))
    scored = score_positions(model, tokenizer, engine, samples, cfg, progress if rank == 0 else None,
                             padded)[:sum(len(chunk) for _, chunk in mine)]
    parts = [iter(part) for part in distributed.all_gather_objects(scored)]
    return [next(parts[c % world]) for c, chunk in chunks for _ in chunk]


def bucket_metrics(scored: list[Scored]) -> dict:
    """Means over positions (each accuracy with its Wilson 95% interval `<name>_ci`); answer_rate and
    completion_length over all samples. Empty bucket: n=0, nulls."""
    if not scored:
        return ({f: (0 if f == "n" else None) for f in FIELDS} | {f"{a}_ci": None for a in ACCURACIES}
                | mtp_metrics([]))
    r = {
        "n": len(scored),
        "ntr_accuracy": float(np.mean([s.correct[0] for s in scored])),
        "ntr_greedy_accuracy": float(np.mean([s.greedy_correct for s in scored])),
        "ntr_pass_at_k": float(np.mean([any(s.correct) for s in scored])),
        "answer_rate": float(np.mean([a for s in scored for a in s.answered])),
        "ntp_accuracy": float(np.mean([s.ntp_correct for s in scored])),
        "completion_length": float(np.mean([n for s in scored for n in s.lengths])),
    }
    return r | {f"{a}_ci": wilson(r[a], r["n"]) for a in ACCURACIES} | mtp_metrics(scored)


def mtp_metrics(scored: list[Scored]) -> dict:
    """Multi-token prediction over the right sampled answers: their mean length in label tokens and in bytes, and
    the share covering more than one token (None when no answer is right)."""
    right = [(j, len("".join(s.sample.label_tokens[:j]).encode())) for s in scored for j in s.right_tokens if j]
    if not right:
        return {"right_answers": 0, "right_tokens_mean": None, "right_bytes_mean": None, "multi_token_share": None}
    return {"right_answers": len(right), "right_tokens_mean": float(np.mean([j for j, _ in right])),
            "right_bytes_mean": float(np.mean([b for _, b in right])),
            "multi_token_share": float(np.mean([j > 1 for j, _ in right]))}


def position_record(s: Scored) -> dict:
    """One evaluated position as JSON: where it comes from, its label, every outcome and completion."""
    return {"key": s.sample.key, "doc_id": s.sample.doc_id, "bucket": s.sample.bucket, "entropy": s.sample.entropy,
            "label": "".join(s.sample.label_tokens), "correct": s.correct, "greedy_correct": s.greedy_correct,
            "ntp_correct": s.ntp_correct, "completions": s.completions, "greedy_completion": s.greedy_completion,
            "right_tokens": s.right_tokens}


def evaluate(model, tokenizer, engine, cfg, shards: ShardSet | None = None,
             chosen: dict[str, list[Sample]] | None = None, details: bool = False, progress=None) -> dict:
    """{bucket: {n, ntr_accuracy, ntr_greedy_accuracy, ntr_pass_at_k, answer_rate, ntp_accuracy, completion_length,
    and a Wilson 95% `<accuracy>_ci` [lo, hi] for each accuracy}} + `meta`.
    `progress(done, total)`: called as positions are scored (rank 0's share under torchrun).
    `details`: also `positions`, one record per distinct position (doc_id, outcomes, completions), and `chosen`,
    the keys of each bucket.
    Seeded and isolated: the caller's RNG state is left as it was. Under torchrun every rank calls it and scores
    its share of the positions; every rank gets the whole result."""
    shards = shards or ShardSet(cfg.shards)
    resolve_shard_defaults(cfg, shards)
    chosen = chosen if chosen is not None else select_positions(shards, tokenizer, cfg)
    unique = {s.key: s for b in EVAL_BUCKETS for s in chosen[b]}
    if not unique:
        raise UserError(f"no usable position to evaluate in '{cfg.shards}'")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(distributed.rank_seed(cfg.seed))
        scored = {s.sample.key: s for s in score_shared(model, tokenizer, engine, list(unique.values()), cfg,
                                                        progress)}
    model.train(was_training)
    result = {b: bucket_metrics([scored[s.key] for s in chosen[b]]) for b in EVAL_BUCKETS}
    result["meta"] = {"k": cfg.samples, "split": eval_split(cfg), "heldout_fraction": cfg.heldout_fraction,
                      "split_seed": cfg.split_seed, "split_block_windows": cfg.split_block_windows,
                      "shards_identity": shards_identity(cfg.shards), "positions": len(unique),
                      "thresholds": dict(zip(BUCKET_NAMES, cfg.bucket_thresholds)), "metric": cfg.entropy_metric}
    if details:
        result["positions"] = [position_record(scored[k]) for k in unique]
        result["chosen"] = {b: [s.key for s in chosen[b]] for b in EVAL_BUCKETS}
    return result


def print_table(result: dict, title: str = "next-token reasoning") -> None:
    from rich.console import Console
    from rich.table import Table

    k = result.get("meta", {}).get("k", "k")
    table = Table(title=title)
    for col in ("bucket", "n", "ntr_acc", "ntr_greedy", f"pass@{k}", "answered", "ntp_acc", "length"):
        table.add_column(col, justify="left" if col == "bucket" else "right")
    for b in EVAL_BUCKETS:
        r = result[b]
        cells = [r[f] for f in FIELDS[1:]]
        table.add_row(b, str(r["n"]), *("-" if v is None else f"{v:.3f}" if i < 5 else f"{v:.1f}"
                                        for i, v in enumerate(cells)))
    Console().print(table)


def temp_beside(path: Path) -> Path:
    """A temp file for `path` in its directory, unique to this call (`.NAME.PID-RANDOM.tmp`, as rpt_data.writer's):
    processes writing the same file at once (one per GPU, the same report) never write, rename or remove each
    other's temp; the last rename wins, whole."""
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def replace_atomically(path: str | Path, fill) -> None:
    """`fill(tmp)` writes a temp file of this call's own (temp_beside), renamed into place as `path`: readers see
    the old file or the new one, whole; the temp is removed if `fill` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(result: dict, path: str | Path) -> None:
    """`result` as JSON at `path`, atomically (replace_atomically)."""
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
