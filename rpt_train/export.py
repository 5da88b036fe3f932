"""`rpt-train export`: the RPT samples `run` would draw (same sampler order, template, chat template, labels in the
policy's tokenizer, held-out split), written for verl, TRL or OpenRLHF, train and held-out apart, in bounded memory."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rpt_common.errors import UserError
from rpt_common.models import load_tokenizer, tokenizer_identity
from rpt_train.candidates import TableSink
from rpt_train.config import ExportConfig, to_dict
from rpt_train.policy import resolve_policy
from rpt_train.samples import PositionSampler, Sample, SampleBuilder, TrainSamples
from rpt_train.templates import PromptBuilder

DATA_SOURCE = "rpt"
SUFFIX = {"verl": ".parquet", "trl": ".parquet", "openrlhf": ".jsonl"}
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_META = [("key", pa.string()), ("doc_id", pa.string()), ("bucket", pa.string()), ("entropy", pa.float32())]
VERL_SCHEMA = pa.schema([
    ("data_source", pa.string()), ("prompt", _MESSAGES), ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), *_META])),
])


def trl_schema(conversational: bool) -> pa.Schema:
    return pa.schema([("prompt", _MESSAGES if conversational else pa.string()), ("label_tokens", pa.list_(pa.string())),
                      ("response_prefix", pa.string()), ("rpt_reward", pa.string()), *_META])


def reward_settings(cfg: ExportConfig) -> dict:
    """What `run` scores with besides the labels, carried in every row (verl, OpenRLHF: in the label; TRL: the
    `rpt_reward` column) so that rpt_train.integrations scores as `run` does: reward values, answer format, and
    the think gate of a run with --think-budget (no `</think>`: the no-answer reward)."""
    return {"correct": cfg.reward_correct, "wrong": cfg.reward_wrong, "no_answer": cfg.reward_no_answer,
            "answer_format": cfg.answer_format, "think_required": cfg.think_budget > 0}


def uncarried(recipe: str | None) -> list[str]:
    """Warnings for the settings of a `run` recipe that no engine adapter can reproduce: extra reward functions
    and the rlp objective (its reward is the policy's information gain)."""
    from rpt_common.recipe import read_yaml

    if not recipe:
        return []
    raw = {str(k).replace("-", "_"): v for k, v in (read_yaml(recipe) or {}).items()}
    layers = [raw] + [{str(k).replace("-", "_"): v for k, v in raw[s].items()}
                      for s in ("run", "train", "export") if isinstance(raw.get(s), dict)]
    out = []
    for layer in layers:
        if layer.get("reward"):
            out.append(f"recipe '{recipe}': its extra reward functions {layer['reward']} are not exported; the "
                       "engines' reward is the RPT reward alone (add them to the engine's reward yourself)")
        if layer.get("objective") not in (None, "rpt"):
            out.append(f"recipe '{recipe}': objective '{layer['objective']}' is not exported; the engines' reward "
                       "is the RPT prefix-match reward")
    return out


def openrlhf_prompt_lead(tok, prompts: PromptBuilder, samples: list[Sample]) -> str:
    """Text put in front of OpenRLHF's `input` so that its ids (OpenRLHF tokenizes it with
    add_special_tokens=False) are `run`'s: the BOS text when `run` adds the tokenizer's BOS (no chat template),
    followed by a space where the tokenizer needs one to write the text's leading '▁' (a Metaspace pre-tokenizer
    with prepend_scheme 'first' prepends it to the start of the whole text only). Checked on `samples`: an export
    whose OpenRLHF prompt ids would differ from `run`'s is refused."""
    lead = []
    if not prompts.chat:
        plain, full = tok("x", add_special_tokens=False)["input_ids"], tok("x")["input_ids"]
        lead = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
    text = tok.decode(lead, skip_special_tokens=False) if lead else ""
    candidates = [text, text + " "] if text else [""]
    for candidate in candidates:
        bad = next((s for s in samples if tok(candidate + prompts.text(s.context), add_special_tokens=False)
                    ["input_ids"] != prompts.ids(s.context)), None)
        if bad is None:
            return candidate
    raise UserError(f"OpenRLHF would tokenize the prompt of sample {bad.key} (document {bad.doc_id}) to other ids "
                    "than `rpt-train run` (it tokenizes `input` without special tokens); use --format trl")


def check_engine(cfg: ExportConfig, prompts: PromptBuilder) -> None:
    """Refuse what an engine cannot reproduce: verl renders the policy's chat template itself, with the generation
    prompt last, so it needs a chat template and cannot prefill a response prefix."""
    if cfg.format != "verl":
        return
    if not prompts.chat:
        raise UserError("verl applies the policy's chat template to the exported messages itself, but the policy has "
                        "none (or --chat-template off); use --format trl or openrlhf, which take rendered prompts")
    if cfg.response_prefix:
        raise UserError("verl cannot prefill a --response-prefix (its agent loop ends the prompt with the chat "
                        "template's generation prompt); drop it, or use --format trl or openrlhf")


def record(fmt: str, s: Sample, prompts: PromptBuilder, split: str, index: int, settings: dict | None = None,
           lead: str = "") -> dict:
    """One exported row in the engine's own schema; labels stay exact strings (JSON where the engine wants one
    string: {"label_tokens": [...], "rpt_reward": settings}). `lead`: OpenRLHF's BOS text (openrlhf_prompt_lead)."""
    meta = {"key": s.key, "doc_id": s.doc_id, "bucket": s.bucket, "entropy": s.entropy}
    settings = settings or {}
    label = json.dumps({"label_tokens": s.label_tokens, "rpt_reward": settings}, ensure_ascii=False)
    if fmt == "verl":
        return {"data_source": DATA_SOURCE, "prompt": prompts.messages(s.context),
                "ability": "next_token_reasoning", "reward_model": {"style": "rule", "ground_truth": label},
                "extra_info": {"split": split, "index": index, **meta}}
    if fmt == "trl":  # conversational unless a response prefix must be prefilled into a rendered prompt
        prompt = prompts.messages(s.context) if trl_conversational(prompts) else prompts.text(s.context)
        return {"prompt": prompt, "label_tokens": s.label_tokens, "response_prefix": prompts.response_prefix,
                "rpt_reward": json.dumps(settings), **meta}
    return {"input": lead + prompts.text(s.context), "label": label, **meta}


def trl_conversational(prompts: PromptBuilder) -> bool:
    return prompts.chat and not prompts.response_prefix


class Writer:
    """Rows appended in batches to `path` through a temporary file, renamed when complete."""

    def __init__(self, path: Path, schema: pa.Schema | None):
        self.path, self.tmp, self.rows = path, path.with_name(path.name + ".tmp"), 0
        self._parquet = pq.ParquetWriter(self.tmp, schema) if schema is not None else None
        self._jsonl = open(self.tmp, "w", encoding="utf-8") if schema is None else None
        self.schema = schema

    def write(self, rows: list[dict]) -> None:
        if self._parquet is not None:
            self._parquet.write_table(pa.Table.from_pylist(rows, schema=self.schema))
        else:
            self._jsonl.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.rows += len(rows)

    def close(self) -> None:
        (self._parquet or self._jsonl).close()
        os.replace(self.tmp, self.path)


def one_pass(sampler: PositionSampler, build: SampleBuilder, limit: int, batch: int, advance) -> Iterator[list[Sample]]:
    """Batches of usable samples in the sampler's order (the order `run` draws them), one epoch at most."""
    left, made = sampler.n - sampler.cursor, 0
    while left > 0 and (limit == 0 or made < limit):
        k = min(batch, left)
        left -= k
        samples = [s for s in build.many([sampler.next() for _ in range(k)]) if s is not None]
        samples = samples[:limit - made] if limit else samples
        made += len(samples)
        advance(k)
        yield samples


PROBE_SAMPLES = 64  # samples built to measure the bytes of a row before an export writes


def probe_samples(cfg: ExportConfig, data: TrainSamples) -> list[Sample]:
    """PROBE_SAMPLES usable samples drawn in another seeded order (its permutation in a scratch file, as `run`'s:
    4 bytes a position would sit in the heap otherwise)."""
    probe = PositionSampler(len(data.cands), cfg.seed + 1, directory=TableSink.scratch_dir())
    build = data.builder(data.cands)
    return [s for s in build.many([probe.next() for _ in range(min(PROBE_SAMPLES, probe.n))]) if s is not None]


def size_estimate(cfg: ExportConfig, data: TrainSamples, prompts: PromptBuilder, streams: dict,
                  drawn: list[Sample] | None = None, lead: str = "") -> dict:
    """{split: (rows planned, bytes planned)} before anything is written: rows = --limit (or every position) of
    each split; bytes = rows x the mean JSON size of the probe samples' rows (parquet compresses that, jsonl
    writes it)."""
    drawn = probe_samples(cfg, data) if drawn is None else drawn
    settings = reward_settings(cfg)
    per_row = (sum(len(json.dumps(record(cfg.format, s, prompts, "train", 0, settings, lead),
                                  ensure_ascii=False).encode()) for s in drawn) / len(drawn)) if drawn else 0.0
    out = {}
    for split, (sampler, _, limit) in streams.items():
        rows = min(limit, sampler.n) if limit else sampler.n
        out[split] = (rows, int(rows * per_row))
    return out


def estimate_line(estimate: dict) -> str:
    parts = [f"{split} <= {rows:,} rows (~{size / 1e9:.3g} GB as JSON)" for split, (rows, size) in estimate.items()]
    return "export will write " + ", ".join(parts) + "; --limit caps the training rows (steps x batch contexts)"


def heldout_stream(cfg: ExportConfig, data: TrainSamples) -> tuple[PositionSampler, SampleBuilder]:
    """The held-out documents' positions under the same position filter (kept by TrainSamples), in a seeded order."""
    sampler = PositionSampler(len(data.heldout_cands), cfg.seed, directory=TableSink.scratch_dir())
    return sampler, data.builder(data.heldout_cands)


def prepare_out(cfg: ExportConfig) -> Path:
    out = Path(cfg.out)
    names = [f"{split}{SUFFIX[cfg.format]}" for split in ("train", "heldout")] + ["export.json"]
    existing = [n for n in names if (out / n).exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"'{out}' already holds an export ({existing[0]}); pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    for n in existing:
        (out / n).unlink()
    return out


def export(cfg: ExportConfig) -> dict:
    """Write OUT/train.{parquet|jsonl} (and heldout.* with --heldout-fraction > 0) plus OUT/export.json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tok = load_tokenizer(resolve_policy(cfg.model))
    prompts = PromptBuilder(tok, cfg.template, cfg.chat_template, cfg.response_prefix)
    check_engine(cfg, prompts)
    data = TrainSamples(cfg, tok, keep_heldout=True)  # fills the shards' entropy metric and buckets into cfg
    out = prepare_out(cfg)
    schema = {"verl": VERL_SCHEMA, "trl": trl_schema(trl_conversational(prompts)), "openrlhf": None}[cfg.format]
    streams = {"train": (data.sampler, data.build, cfg.limit)}
    if cfg.heldout_fraction > 0:
        streams["heldout"] = (*heldout_stream(cfg, data), cfg.heldout_limit)
    drawn = probe_samples(cfg, data)
    lead = openrlhf_prompt_lead(tok, prompts, drawn) if cfg.format == "openrlhf" else ""
    settings = reward_settings(cfg)
    estimate = size_estimate(cfg, data, prompts, streams, drawn, lead)
    print(estimate_line(estimate), file=sys.stderr, flush=True)
    files = {}
    bar = Progress(TextColumn("[bold]export {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("positions, {task.fields[rows]:,} samples"), TimeElapsedColumn(),
                   console=Console(stderr=True), disable=not cfg.progress)
    with bar:
        for split, (sampler, build, limit) in streams.items():
            task = bar.add_task(split, total=sampler.n, rows=0)
            writer = Writer(out / f"{split}{SUFFIX[cfg.format]}", schema)
            for samples in one_pass(sampler, build, limit, cfg.batch_rows, lambda k: bar.advance(task, k)):
                writer.write([record(cfg.format, s, prompts, split, writer.rows + j, settings, lead)
                              for j, s in enumerate(samples)])
                bar.update(task, rows=writer.rows)
            writer.close()
            files[split] = {"file": writer.path.name, "rows": writer.rows, "positions": sampler.n,
                            "skipped": build.skipped}
    if files["train"]["rows"] == 0:
        raise UserError(f"no training position in '{cfg.shards}' gives a usable sample for this policy's tokenizer "
                        f"({files['train']['skipped']} skipped)")
    meta = {"format": cfg.format, "files": files, "estimate": {k: {"rows": r, "bytes": b} for k, (r, b) in estimate.items()},
            "config": to_dict(cfg), "tokenizer": tokenizer_identity(tok),
            "chat_template": prompts.chat, "response_prefix": cfg.response_prefix, "rpt_reward": settings,
            "openrlhf_prompt_lead": lead}
    tmp = out / "export.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp, out / "export.json")
    return meta
