"""Experiments as data: a spec (YAML) names the options every arm starts from, an optional warm start, the eval
design and the arms, each an arm kind plus option overrides; `rpt-train experiment SPEC [ARM...]` runs them.

Every arm ends in the same held-out evaluation (same positions, samples, seed); each finished arm's record is
written at once to RESULTS/NAME.arms/ARM.json (kept in git: `out/` does not survive a new machine) and is never
rerun; a training arm stopped half-way resumes from its last checkpoint under OUT/ARM/train. Compute per arm is
summed from the trainer's per-step token counters (rpt_train/report.py states the FLOP formula). Arm kinds are a
registry (`register_arm_kind`): `eval`, `rpt`, `shuffled`, `sft`; a later kind plugs in with one decorator.
The spec format: docs/experiments.md."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rpt_common.errors import UserError
from rpt_common.recipe import read_yaml
from rpt_train.config import (EVAL_GENERATION, PROMPT_OPTIONS, RUN_OPTIONS, SAMPLING_OPTIONS, EvalConfig,
                               TrainConfig, field_types, load_config, to_dict)
from rpt_train.metrics import machine

SPEC_KEYS = {"name", "title", "recipe", "base", "warm", "eval", "arms", "comparisons", "metrics", "out", "results",
             "alpha", "power", "primary_bucket", "notes", "levers", "factors"}
LEVERS = {"positions": 100}  # a spec's `levers:` (true or a mapping) overrides these
SPLIT_KEYS = ("heldout_fraction", "split_seed", "split_block_windows")  # the base's for every arm (load_spec)
ARM_KEYS = {"kind", "match_flops", "contexts_of", "label_tokens", "model", "description", "eval"}
WARM = {"fraction": 0.2, "steps": 40, "batch": 16, "lr": 1e-5}  # a spec's `warm:` overrides these
METRICS = ("ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "ntp_accuracy")
MATCHED_STEPS = 10**6  # a FLOP-matched arm stops at its budget; this only caps the step loop
# training options that change what an arm's prompt or completions look like (an eval of its run would take them)
TRAINED_PROMPT = PROMPT_OPTIONS + SAMPLING_OPTIONS + EVAL_GENERATION + ("think_budget_final", "think_decay_steps")
# what an arm's own eval: section may set: how the model is prompted, samples and generates, and where it runs.
# Not what changes the task the report pairs the arms on by position key (the positions, their labels and
# contexts, the answer format, samples per position, the eval seed, the split): those are the design's (eval:).
ARM_EVAL = (("template", "chat_template", "response_prefix") + SAMPLING_OPTIONS + EVAL_GENERATION
            + ("rollout_batch_size", "static_cache", "device", "dtype"))
# what an eval's settings say about where and how fast it runs, never about what it scores; with the model (each
# arm's own) never compared between an arm's record and another's or the spec's (eval_differences)
EVAL_RUNTIME = ("model", "out", "baseline", "device", "rollout_batch_size", "static_cache")
LOCK_RETRIES = (0.2, 1.0)  # s between tries of a lock not waited for: a lock_holder probe holds one an instant
_NOTED: set[str] = set()  # notes said in this process (the CLI loads a spec twice)


def single_process() -> None:
    """`rpt-train experiment` runs its arms one after another in one process; under torchrun every rank would run
    the warm start and every arm and write the same files (one process per GPU shares them out: run_arm)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("rpt-train experiment runs its arms one after another in one process, one device each; "
                        f"under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) every rank would run the warm start "
                        "and every arm and write the same files. Run it without torchrun. To use several GPUs, start "
                        "`rpt-train experiment SPEC` once per GPU (`CUDA_VISIBLE_DEVICES=1 rpt-train experiment SPEC "
                        "&`, ...): each process takes the arms no other one runs (a lock per arm), or name the "
                        "arms of each (`CUDA_VISIBLE_DEVICES=1 rpt-train experiment SPEC ARM`), then write the "
                        "report with `rpt-train experiment SPEC --report-only` (docs/experiments.md)")


# ---- the spec -----------------------------------------------------------------------------------------------------

@dataclass(kw_only=True, slots=True)
class Arm:
    name: str
    kind: str
    options: dict  # TrainConfig overrides (already type-checked)
    match_flops: str | None = None  # train until this arm's FLOPs are spent (sft)
    contexts_of: str | None = None  # train on exactly the contexts this arm rolled out (sft)
    label_tokens: int = 1  # sft: label tokens in the supervised answer
    model: str | None = None  # eval: the model to evaluate (default: the experiment's start model)
    description: str = ""
    eval: dict = field(default_factory=dict)  # this arm's eval overrides (e.g. a thinking arm's template, budget)

    def depends_on(self) -> list[str]:
        return [a for a in (self.match_flops, self.contexts_of) if a]


@dataclass(kw_only=True, slots=True)
class Spec:
    path: str
    name: str
    title: str
    train: dict  # options every arm starts from (TrainConfig keys)
    eval: dict  # the eval design (EvalConfig keys)
    warm: dict | None
    arms: dict[str, Arm]
    comparisons: list[tuple[str, str]]
    metrics: tuple[str, ...] = METRICS
    out: str = ""
    results: str = "results"
    alpha: float = 0.05
    power: float = 0.8
    primary_bucket: str = "all"
    notes: list[str] = field(default_factory=list)
    levers: dict | None = None  # the `levers` stage (rpt_train/levers.py): None = not measured
    factors: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # name -> pairs whose mean effect

    @property
    def arms_dir(self) -> Path:
        return Path(self.results) / f"{self.name}.arms"


def _norm(d: dict) -> dict:
    return {str(k).replace("-", "_"): v for k, v in (d or {}).items()}


def _options(where: str, raw: dict, classes) -> dict:
    """`raw` option values checked against the fields of `classes` (the first that has each key sets its type)."""
    from rpt_train.config import coerce

    out = {}
    for key, value in _norm(raw).items():
        cls = next((c for c in classes if key in field_types(c)), None)
        if cls is None:
            raise UserError(f"{where}: unknown option '{key}' (an option of `rpt-train run` or `rpt-train eval`, "
                            "see docs/cli.md)")
        out[key] = coerce(key, field_types(cls)[key], value)
    return out


def load_spec(path: str) -> Spec:
    """Read and check a spec; every problem is one sentence naming the file and the key."""
    raw = _norm(read_yaml(path))
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise UserError(f"spec '{path}': unknown key(s) {unknown}; known: {sorted(SPEC_KEYS)}")
    here = Path(path).parent
    recipe: dict = {}
    if raw.get("recipe"):  # a run/eval recipe: its flat keys, then its run: and eval: sections
        rp = Path(raw["recipe"])
        rp = rp if rp.exists() else here / rp
        recipe = _norm(read_yaml(str(rp)))
    flat = {k: v for k, v in recipe.items() if k not in ("run", "train", "eval", "tag", "export", "warm")}
    train = {**flat, **_norm(recipe.get("run") or recipe.get("train")), **_norm(raw.get("base"))}
    train = _options(f"spec '{path}' (recipe/base)", train, (TrainConfig, EvalConfig))
    design = {**flat, **_norm(recipe.get("eval")), **_norm(raw.get("base")), **_norm(raw.get("eval"))}
    design = _options(f"spec '{path}' (eval)", design, (EvalConfig, TrainConfig))
    # the training base's split (a recipe's run: section included) is the eval's too where the design sets none
    design = {**{k: train[k] for k in SPLIT_KEYS if k in train}, **design}
    split = [k for k in SPLIT_KEYS if design.get(k) != train.get(k)]
    if split:  # the eval would score positions some arm trained on, or leave out ones no arm saw
        raise UserError(f"spec '{path}': the eval design sets {', '.join(k.replace('_', '-') for k in split)} "
                        f"other than the training base ({', '.join(f'{design.get(k)!r} vs {train.get(k)!r}' for k in split)}); "
                        "the held-out split is the base's for training and eval: set it under base: only")
    warm = raw.get("warm", recipe.get("warm"))
    if warm is not None:
        warm = _norm(warm)
        bad = set(warm) - set(WARM)
        if bad:
            raise UserError(f"spec '{path}': unknown warm: key(s) {sorted(bad)}; known: {sorted(WARM)}")
        warm = {**WARM, **warm}
    if not isinstance(raw.get("arms"), dict) or not raw["arms"]:
        raise UserError(f"spec '{path}': `arms:` must map arm names to a kind and options, e.g. `before: {{kind: "
                        "eval}`")
    arms = {}
    for name, a in raw["arms"].items():
        a = _norm(a or {})
        where = f"spec '{path}', arm '{name}'"
        kind = a.pop("kind", None)
        if kind not in ARM_KINDS:
            raise UserError(f"{where}: kind {kind!r} is not one of {sorted(ARM_KINDS)}")
        extra = {k: a.pop(k) for k in list(a) if k in ARM_KEYS and not (k == "model" and kind != "eval")}
        if "eval" in extra:  # eval options of this arm only (the design's positions stay the same for every arm)
            extra["eval"] = _options(f"{where} (eval)", extra["eval"] or {}, (EvalConfig,))
        split = [k for k in SPLIT_KEYS if k in a or k in (extra.get("eval") or {})]
        task = [k for k in extra.get("eval") or {} if k not in ARM_EVAL and k not in SPLIT_KEYS]
        if task:
            raise UserError(f"{where}: its eval: section sets {', '.join(k.replace('_', '-') for k in task)}, which "
                            "change(s) the task (which positions, labels, contexts, answers or samples are scored), "
                            "but the report pairs every arm's outcomes position by position on one task; set it "
                            "under the spec's eval: (every arm) or in another spec; an arm's eval: may set only "
                            f"{', '.join(k.replace('_', '-') for k in ARM_EVAL)}")
        if split:
            raise UserError(f"{where}: sets {', '.join(k.replace('_', '-') for k in split)}, but the held-out split "
                            "is the base's for every arm (every arm's eval and the warm start's units depend on it); "
                            "set it under base:")
        own = a.get("exclude_docs")  # under warm: dropped (docs.txt); else it would replace base:'s list
        if own is not None and (warm is not None or train.get("exclude_docs") not in (None, "", own)):
            raise UserError(f"{where}: sets exclude-docs, but " + (
                "under warm: every arm excludes OUT/warm/docs.txt (the warm units and base:'s exclude-docs list)"
                if warm is not None else
                f"it would replace base:'s exclude-docs '{train['exclude_docs']}' (e.g. a benchmark's documents)")
                + "; list every document to exclude in one file under base: exclude-docs")
        arms[str(name)] = Arm(name=str(name), kind=kind, options=_options(where, a, (TrainConfig,)), **extra)
    for arm in arms.values():
        for dep in arm.depends_on():
            if dep not in arms:
                raise UserError(f"spec '{path}', arm '{arm.name}': refers to arm '{dep}', which the spec does not have")
            if not ARM_KINDS[arms[dep].kind].trains:
                raise UserError(f"spec '{path}', arm '{arm.name}': arm '{dep}' trains nothing to match or copy")
        if (arm.match_flops or arm.contexts_of) and arm.kind != "sft":
            raise UserError(f"spec '{path}', arm '{arm.name}': match_flops / contexts_of are options of sft arms")
        if arm.match_flops and arm.contexts_of:
            raise UserError(f"spec '{path}', arm '{arm.name}': give match_flops or contexts_of, not both")
        if arm.contexts_of:  # contexts.jsonl holds indices into that arm's candidate positions
            ref = position_options(arms[arm.contexts_of])
            clash = sorted(k for k, v in position_options(arm).items() if ref.get(k, train.get(k)) != v)
            if clash:
                raise UserError(f"spec '{path}', arm '{arm.name}': contexts_of '{arm.contexts_of}' trains on that "
                                f"arm's positions; drop its own {', '.join(clash)}")
    comparisons = []
    for c in raw.get("comparisons") or []:
        pair = (c.get("a"), c.get("b")) if isinstance(c, dict) else tuple(c) if isinstance(c, (list, tuple)) else ()
        if len(pair) != 2 or any(x not in arms for x in pair):
            raise UserError(f"spec '{path}': comparison {c!r} must name two arms of the spec, e.g. [rpt, before]")
        comparisons.append(tuple(map(str, pair)))
    levers = raw.get("levers")
    if levers is not None and levers is not False:
        levers = {**LEVERS, **(_norm(levers) if isinstance(levers, dict) else {})}
        if set(levers) - set(LEVERS):
            raise UserError(f"spec '{path}': unknown levers: key(s) {sorted(set(levers) - set(LEVERS))}")
    else:
        levers = None
    if "levers" in raw["arms"]:
        raise UserError(f"spec '{path}': 'levers' names the levers stage; call the arm otherwise")
    factors = {}
    for fname, pairs in (raw.get("factors") or {}).items():
        ok = isinstance(pairs, list) and pairs and all(isinstance(p, (list, tuple)) and len(p) == 2
                                                       and all(x in arms for x in p) for p in pairs)
        if not ok:
            raise UserError(f"spec '{path}': factor '{fname}' must list pairs of the spec's arms, e.g. "
                            "[[high-learn, all-learn], [high-uniform, all-uniform]]")
        factors[str(fname)] = [tuple(map(str, p)) for p in pairs]
    metrics = tuple(raw.get("metrics") or METRICS)
    if set(metrics) - set(METRICS):
        raise UserError(f"spec '{path}': metrics must be among {list(METRICS)}")
    name = str(raw.get("name") or Path(path).stem)
    spec = Spec(path=str(path), name=name, title=str(raw.get("title") or name), train=train, eval=design, warm=warm,
                arms=arms, comparisons=comparisons, metrics=metrics,
                out=str(raw.get("out") or Path("out") / "experiments" / name),
                results=str(raw.get("results") or "results"), alpha=float(raw.get("alpha", 0.05)),
                power=float(raw.get("power", 0.8)), primary_bucket=str(raw.get("primary_bucket", "all")),
                notes=list(raw.get("notes") or []), levers=levers, factors=factors)
    for arm in arms.values():  # every arm's config must load now, not after an hour of another arm's training
        Experiment(spec).train_config(arm, check_only=True)
        Experiment(spec).eval_config("demo", arm)
    Experiment(spec).eval_config("demo")
    note_own_prompts(spec)
    return spec


def note_own_prompts(spec: Spec) -> None:
    """One stderr note naming the training arms whose options change the prompt or the completions (template,
    think budget, temperature, ...) from base: but that have no eval: section: they are evaluated with the common
    design, as every arm is (Experiment.eval_config), not as they trained."""
    import sys

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in TRAINED_PROMPT}
    said = []
    for arm in spec.arms.values():
        if arm.eval or not ARM_KINDS[arm.kind].trains:
            continue
        own = {k: v for k, v in arm.options.items() if k in TRAINED_PROMPT and v != spec.train.get(k, defaults[k])}
        if own:
            common = Experiment(spec).eval_config("demo", arm)
            said.append(f"arm '{arm.name}' trains with " + ", ".join(
                f"--{k.replace('_', '-')} {v!r}" + (f" (eval: {getattr(common, k)!r})" if hasattr(common, k) else "")
                for k, v in own.items()))
    text = (f"note: spec '{spec.path}': {'; '.join(said)}; without an eval: section such an arm is evaluated with the "
            "spec's common design (base: and eval:), like every other arm, not as it trained; give it an eval: "
            "section to evaluate it as it trained (the report names that section)")
    if said and text not in _NOTED:
        _NOTED.add(text)
        print(text, file=sys.stderr)


POSITION_TRAIN = ("curriculum", "curriculum_steps")  # beyond SampleConfig: the table each step's indices point into


def position_options(arm: Arm) -> dict:
    """An arm's overrides of the options that define its candidate positions (what contexts.jsonl indexes): the
    SampleConfig ones but the seed, and the curriculum (under --curriculum each step's indices are into its stage's
    own table: objectives.CurriculumSamples; an sft arm with contexts_of rebuilds them from the same stages)."""
    from rpt_train.config import SampleConfig

    return {k: v for k, v in arm.options.items()
            if (k in field_types(SampleConfig) and k != "seed") or k in POSITION_TRAIN}


# ---- arm kinds ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArmKind:
    name: str
    trains: bool
    run: Callable  # (Experiment, Arm) -> (model to evaluate, facts for the record)
    help: str


ARM_KINDS: dict[str, ArmKind] = {}


def register_arm_kind(name: str, help: str, trains: bool = True):
    """Decorator: `fn(exp, arm) -> (model path or spec to evaluate, dict of facts)` becomes arm kind `name`."""
    def deco(fn):
        ARM_KINDS[name] = ArmKind(name=name, trains=trains, run=fn, help=help)
        return fn
    return deco


@register_arm_kind("eval", "evaluate a model as it is (the start model, or the arm's `model:`)", trains=False)
def _eval_arm(exp: "Experiment", arm: Arm):
    return arm.model or exp.start_model(), {}


@register_arm_kind("rpt", "rpt-train run with the arm's options (the prefix-match reward)")
def _rpt_arm(exp: "Experiment", arm: Arm):
    from rpt_train.trainer import train

    cfg = exp.train_config(arm)
    train(cfg)
    return cfg.out, {"train_config": to_dict(cfg)}


def shuffled_reward(seed: int):
    """The RPT reward permuted across each round's rollouts: same reward mix, no information about the answers."""
    from rpt_train.reward import prefix_match

    rng = random.Random(seed)

    def fn(items):
        r = [1.0 if prefix_match(x.answer, x.label_tokens) else 0.0 for x in items]
        rng.shuffle(r)
        return r
    return fn


@register_arm_kind("shuffled", "rpt with rewards shuffled across each round's rollouts (isolates the reward signal)")
def _shuffled_arm(exp: "Experiment", arm: Arm):
    from rpt_train.trainer import train

    cfg = exp.train_config(arm, {"reward_correct": 0.0})  # the prefix-match reward comes back permuted
    train(cfg, reward_fns=[shuffled_reward(cfg.seed)])
    return cfg.out, {"train_config": to_dict(cfg)}


@register_arm_kind("sft", "supervised cross-entropy on the true next token(s) in the answer format: on the contexts "
                   "another arm rolled out (contexts_of), with another arm's FLOPs (match_flops), or steps x "
                   "batch-prompts contexts of the training stream")
def _sft_arm(exp: "Experiment", arm: Arm):
    from rpt_train.sft import next_contexts, same_contexts, sft_train

    if arm.contexts_of:
        path = exp.kept_contexts(arm.contexts_of)
        steps = len({json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()})
        cfg = exp.train_config(arm, {**position_options(exp.spec.arms[arm.contexts_of]), "steps": steps})
        totals = sft_train(cfg, same_contexts(path), arm.label_tokens)
    elif arm.match_flops:
        target = exp.finished(arm.match_flops)["compute"]["flops"]
        if target is None:
            raise UserError(f"arm '{arm.name}': arm '{arm.match_flops}' has no FLOP count (an older record): "
                            "rerun it with `--rerun` to match it")
        cfg = exp.train_config(arm, {"steps": arm.options.get("steps", MATCHED_STEPS)})
        if cfg.lr_schedule != "constant":
            raise UserError(f"arm '{arm.name}': a FLOP-matched arm's step count is known only at the end; use "
                            "lr_schedule: constant")
        budget = matched_tokens(target, exp.params(cfg.model))
        totals = sft_train(cfg, next_contexts(cfg.batch_prompts), arm.label_tokens, max_tokens=budget)
        totals["matched_flops"] = target
    else:
        cfg = exp.train_config(arm)
        totals = sft_train(cfg, next_contexts(cfg.batch_prompts), arm.label_tokens)
    return str(Path(cfg.out) / "model"), {"sft": totals, "train_config": to_dict(cfg)}


# ---- compute ---------------------------------------------------------------------------------------------------------

def non_embedding_params(model: str) -> int:
    """N of the FLOP formula: the model's parameters without its token embedding (and without an untied output
    embedding), counted on the meta device from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rpt_common.models import resolve_model_path
    from rpt_train.policy import resolve_policy

    directory, gguf = resolve_model_path(resolve_policy(model))
    config = AutoConfig.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    skip = {id(m.get_input_embeddings().weight)}
    out_emb = m.get_output_embeddings()
    if out_emb is not None:
        skip.add(id(out_emb.weight))
    return sum(p.numel() for p in m.parameters() if id(p) not in skip)


def flops(n_params: int, forward_tokens: int | None, backward_tokens: int | None) -> float | None:
    """2 N per token forward, 4 N per token backward (Kaplan et al. 2020), N = non-embedding parameters."""
    if forward_tokens is None or backward_tokens is None:
        return None
    return 2.0 * n_params * forward_tokens + 4.0 * n_params * backward_tokens


def matched_tokens(target_flops: float, n_params: int) -> int:
    """Tokens an SFT arm may train (each one forward and backward: 6 N FLOPs) within `target_flops`."""
    return int(target_flops // (6 * n_params))



def compute_of(metrics: list[dict], n_params: int) -> dict:
    """Training compute summed over an arm's metrics.jsonl (None where the run logged no such counter)."""
    def total(key):
        vals = [m.get(key) for m in metrics]
        return None if any(v is None for v in vals) else int(sum(vals))
    if not metrics:
        return {"rollout_tokens": 0, "forward_tokens": 0, "backward_tokens": 0, "flops": 0.0, "train_seconds": 0.0}
    fwd, bwd = total("forward_tokens"), total("backward_tokens")
    return {"rollout_tokens": total("rollout_tokens") or 0, "forward_tokens": fwd, "backward_tokens": bwd,
            "flops": flops(n_params, fwd, bwd), "train_seconds": round(sum(m.get("seconds", 0) for m in metrics), 1)}


# ---- running -----------------------------------------------------------------------------------------------------------

def eval_differences(a: dict, b: dict, allowed=(), same_shards: bool = False) -> list[str]:
    """The keys whose values differ between two eval configs as records keep them (to_dict(EvalConfig)), but
    EVAL_RUNTIME and `allowed` ones. Not compared: a key one of them lacks (a record of an older version), a
    split key one leaves unresolved (None: the run's own or the shards' default; the eval's meta records the
    block size it resolved to, report.split_windows compares those), and the shards' path when `same_shards`
    (their identity is the same: shards_of; copied or moved, they are the same task)."""
    return [k for k in a if k in b and k not in EVAL_RUNTIME and k not in allowed and a[k] != b[k]
            and not (k in SPLIT_KEYS and (a[k] is None or b[k] is None)) and not (k == "shards" and same_shards)]


def shards_of(record: dict) -> str | None:
    """The identity of the shards a record was evaluated on (rpt_common.shards.shards_identity, in its eval meta;
    None in records of older versions, whose shards are compared by path)."""
    meta = record.get("eval", {}).get("meta", {}) if isinstance(record.get("eval"), dict) else {}
    return meta.get("shards_identity") if isinstance(meta, dict) else None


def same_shards(a: str | None, b: str | None) -> bool:
    """Two shard identities known and equal."""
    return a is not None and a == b


def held_path(path: Path) -> Path:
    """The fallback lock of `path` where the filesystem has no flock: PATH.held, made by exclusive creation."""
    return path.with_name(path.name + ".held")


_MINE: set[str] = set()  # the fallback locks this process made (and holds)


def _pid_namespace() -> str | None:
    """This process's pid namespace (`pid:[INODE]`, Linux), None where there is no /proc: containers on one host
    that share its name (host networking) each have their own, and their pids mean nothing to each other."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _me() -> str:
    """The line a fallback lock holds: `pid N on HOST`, and `in pid:[INODE]` (its pid namespace) where known."""
    ns = _pid_namespace()
    return f"pid {os.getpid()} on {platform.node()}" + (f" in {ns}" if ns else "")


def _held_by(held: Path) -> str | None:
    """The line (`pid N on HOST [in NAMESPACE]`) of the live holder of the fallback lock `held`, or None: no file,
    or one whose holder was a process of this host and pid namespace that has died (a stale lock, taken over), or
    one naming this process that it did not make (left by an earlier process with the same pid). A holder that
    cannot be checked - on another host, or in another pid namespace of this one (a container beside this one, or
    one that ran before a restart) - is respected, and its line says to delete the file if no such process runs."""
    try:
        line = held.read_text().strip()
    except FileNotFoundError:
        return None
    parts = line.split()
    if len(parts) in (4, 6) and parts[0] == "pid" and parts[2] == "on" and parts[1].isdigit() \
            and (len(parts) == 4 or parts[4] == "in"):
        ns, here = (parts[5] if len(parts) == 6 else None), _pid_namespace()
        if parts[3] == platform.node() and (ns is None or here is None or ns == here):
            if int(parts[1]) == os.getpid():
                return line if os.path.abspath(held) in _MINE else None
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass  # alive, another user's
            return line
        where = parts[3] if parts[3] != platform.node() else f"{parts[3]} in {ns} (another pid namespace)"
        return f"{line}; if no such process runs on {where}, delete '{held}'"
    return f"{line or '?'}; if no process holds it, delete '{held}'"


def _take_held(held: Path) -> str | None:
    """One try at the fallback lock `held` (exclusive creation, `pid N on HOST` in it): None when this process now
    holds it, else the holder's line (_held_by). A stale file (its holder dead on this host) is moved aside under a
    name of this process's own, and deleted when it still is that stale file (else put back: another process took
    it over first)."""
    me = _me()
    for _ in range(3):
        try:
            fd = os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                stale = held.read_text()
            except FileNotFoundError:
                continue
            holder = _held_by(held)
            if holder is not None:
                return holder
            aside = held.with_name(f"{held.name}.{os.getpid()}.stale")
            try:
                os.rename(held, aside)
            except FileNotFoundError:
                continue
            if aside.read_text() != stale:  # a live lock taken over meanwhile: put it back
                with contextlib.suppress(OSError):
                    os.link(aside, held)
            aside.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        _MINE.add(os.path.abspath(held))
        return None
    return _held_by(held) or "?"


@contextlib.contextmanager
def exclusive(path: Path, waiting: str | None = None):
    """An flock on `path` (made, with its folder), held for the block and released when it ends or the process dies,
    with `pid N on HOST` written in it for the others' messages. Yields (holder, unlocked). holder: None when this
    process holds the lock; when another does, with `waiting` (a message: {holder}, {lock}) this one says it on
    stderr and waits for it; without, it yields that process's line (after LOCK_RETRIES: a lock_holder probe holds
    the lock an instant) and the caller skips the work. On a filesystem without flock (ENOLCK, ENOSYS...: Lustre
    without -o flock, NFSv3 without lockd) the lock is PATH.held instead (held_path), made by exclusive creation
    with `pid N on HOST` in it and deleted when the block ends; one whose holder died on this host is taken over,
    one held from another host is respected (its message says to delete the file if no process runs there).
    unlocked: why the block runs unlocked (neither lock could be taken), and the caller says so."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        holder = unlocked = None
        fallback = False
        for wait in (*LOCK_RETRIES, None):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holder = None
                break
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "?"
                if waiting is not None:
                    print(waiting.format(holder=holder, lock=lock.name), file=sys.stderr)
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    holder = None
                    break
                if wait is not None:
                    time.sleep(wait)
            except OSError as e:
                fallback = True
                note = (f"note: cannot flock '{lock.name}' ({e.strerror or e}): locking by exclusive creation of "
                        f"'{held_path(path)}' (a file left by a process on another host that no longer runs: "
                        "delete it)")
                if note not in _NOTED:
                    _NOTED.add(note)
                    print(note, file=sys.stderr)
                break
        if fallback:
            held = held_path(path)
            try:
                for wait in (*LOCK_RETRIES, None):
                    holder = _take_held(held)
                    if holder is None:
                        break
                    if waiting is not None:
                        print(waiting.format(holder=holder, lock=held), file=sys.stderr)
                        while holder is not None:
                            time.sleep(1.0)
                            holder = _take_held(held)
                        break
                    if wait is not None:
                        time.sleep(wait)
            except OSError as e:
                holder, unlocked = None, f"cannot lock '{lock.name}' nor create '{held}' ({e.strerror or e})"
            try:
                yield holder, unlocked
            finally:
                if holder is None and unlocked is None:
                    held.unlink(missing_ok=True)
                    _MINE.discard(os.path.abspath(held))
            return
        if holder is None:  # who holds it, for the others' messages
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {platform.node()}\n")
            lock.flush()
        yield holder, unlocked


def exit_on_sigterm() -> None:
    """SIGTERM (scancel, a Slurm time limit, docker stop) exits through SystemExit (status 143) instead of killing
    the process outright, so that `finally` blocks run: a fallback lock (PATH.held) is deleted, not left behind to
    be mistaken for a live holder. A checkpoint write it interrupts is one a kill would interrupt too (they are
    atomic)."""
    import signal

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def lock_holder(path: Path) -> str | None:
    """The line of the process that holds the lock on `path` (exclusive), or None: no file, nobody. A probe: it
    takes a shared flock for an instant (exclusive retries past it); where flock fails, the fallback PATH.held."""
    import fcntl

    if not path.exists():
        return None
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "?"
        except OSError:
            return _held_by(held_path(path))
    return None


def arm_lock(spec: "Spec", name: str) -> Path:
    """The flock of an arm (or the levers stage) while a process runs it: OUT/ARM.lock, beside its work folder
    (which --rerun deletes)."""
    return Path(spec.out) / f"{name}.lock"


def warm_base(base: TrainConfig, block_windows: int | None = None, excluded: frozenset[str] | None = None) -> dict:
    """The base: options a warm start depends on beyond warm: (recorded in warm.json, checked on reuse): the shards
    and model (paths as given), the user's exclude-docs list (path as given: no warm unit is in it, docs.txt holds
    its lines; its content too, as a digest: an edited list is a change; `excluded`: its ids when read already) and
    the held-out split, which also decides the warm units: its fraction, seed and (`block_windows`,
    resolved by split_blocks; left out when None) unit."""
    from rpt_train.samples import excluded_digest, ids_digest

    digest = (excluded_digest(base.exclude_docs) if excluded is None else
              ids_digest(excluded) if base.exclude_docs else None)
    out = {"base_model": base.model, "base_shards": base.shards, "exclude_docs": base.exclude_docs,
           "exclude_docs_sha256": digest, "heldout_fraction": base.heldout_fraction, "split_seed": base.split_seed}
    return out if block_windows is None else {**out, "split_block_windows": block_windows}


def split_blocks(base: TrainConfig, shards=None) -> int:
    """The held-out unit of `base` as a run on its shards resolves it (samples.resolve_shard_defaults):
    --split-block-windows, else 16 for continuous shards, 0 (documents) for structured ones."""
    import copy

    from rpt_train.samples import ShardSet, resolve_shard_defaults

    cfg = copy.copy(base)
    resolve_shard_defaults(cfg, shards or ShardSet(base.shards))
    return cfg.split_block_windows


class Experiment:
    """One spec on this machine: where its work goes (OUT/ARM/train), where finished arms are kept
    (RESULTS/NAME.arms/), the start model (the warm start's when the spec has one)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.root = Path(spec.out)
        self.kept = spec.arms_dir
        self._params: dict[str, int] = {}
        # --rerun deletes only what is older: a record written since was made by another process in this round
        self.started = time.time()

    # configs
    def start_model(self) -> str:
        return str(self.root / "warm" / "train" / "model") if self.spec.warm else self.spec.train.get("model", "demo")

    def train_config(self, arm: Arm, extra: dict | None = None, check_only: bool = False) -> TrainConfig:
        options = {**self.spec.train, **arm.options, **(extra or {})}
        options = {k: v for k, v in options.items() if k in field_types(TrainConfig)}
        options |= {"out": str(self.root / arm.name / "train"), "resume": True}
        if self.spec.warm:  # every arm starts from the warm-started model and never trains on its documents nor on
            # base:'s exclude-docs list (docs.txt holds both; an arm's own list is refused at load)
            options |= {"model": self.start_model(), "exclude_docs": str(self.root / "warm" / "docs.txt")}
        if check_only:
            options["exclude_docs"] = ""
        return load_config(TrainConfig, None, options)

    def eval_config(self, model: str, arm: Arm | None = None) -> EvalConfig:
        """The held-out eval of `model`: the spec's design (base: and eval:) and the arm's own eval: section, nothing
        else. `rpt-train eval` of a run directory takes the prompt, sampling and generation options (RUN_OPTIONS) it
        is not given from the run's config.yaml (rpt_train.config.inherit_prompt); here each is given: the value the
        design gives a model that is no run. So an arm that trains with its own template, temperature or think
        budget is evaluated as every other arm unless its eval: section says otherwise (the report names those)."""
        design = {k: v for k, v in self.spec.eval.items() if k in field_types(EvalConfig)}
        design |= arm.eval if arm is not None else {}
        common = load_config(EvalConfig, None, {**design, "split": "all", "model": "demo", "out": ""})
        pinned = {k: getattr(common, k) for k in RUN_OPTIONS}
        return load_config(EvalConfig, None, {"split": "heldout", **design, **pinned, "model": model, "out": ""})

    def params(self, model: str) -> int:
        if model not in self._params:
            self._params[model] = non_embedding_params(model)
        return self._params[model]

    # finished arms
    def record_path(self, arm: str) -> Path:
        return self.kept / f"{arm}.json"

    def finished(self, arm: str) -> dict:
        p = self.record_path(arm)
        if not p.exists():
            raise UserError(f"arm '{arm}' is not finished ('{p}' is missing); run `rpt-train experiment "
                            f"{self.spec.path} {arm}` first")
        return json.loads(p.read_text())

    def kept_contexts(self, arm: str) -> Path:
        """The contexts an RPT arm rolled out: this machine's run, else the copy kept beside its record."""
        self.finished(arm)
        for p in (self.root / arm / "train" / "contexts.jsonl", self.kept / f"{arm}.contexts.jsonl"):
            if p.exists():
                return p
        raise UserError(f"arm '{arm}' is finished but its contexts.jsonl is neither in '{self.root / arm}' nor kept "
                        f"in '{self.kept}'")

    def order(self, names: list[str] | None) -> list[str]:
        """The arms to run, each after the arms it depends on (those must be asked for too, or finished)."""
        names = names or list(self.spec.arms)
        bad = [n for n in names if n not in self.spec.arms]
        if bad:
            raise UserError(f"spec '{self.spec.path}' has no arm(s) {bad}; its arms: {list(self.spec.arms)}")
        done, out = set(), []

        def visit(n: str):
            if n in done:
                return
            done.add(n)
            for d in self.spec.arms[n].depends_on():
                if d in names:
                    visit(d)
                elif not self.record_path(d).exists():
                    raise UserError(f"arm '{n}' needs arm '{d}' finished first; run `rpt-train experiment "
                                    f"{self.spec.path} {d} {n}`")
            out.append(n)
        for n in names:
            visit(n)
        return out

    # stages
    def check_warm(self, done: Path, base: TrainConfig) -> dict:
        """The warm start's record at `done` (warm.json), when made with the spec's warm: options, base shards and
        model (paths as given) and held-out split (heldout-fraction, split-seed, split-block-windows: they also
        decide which units are warm); a change is refused in one sentence: the old warm model would be reused
        silently. An older warm.json without some of these keys: those cannot be checked; but one without `units`
        (made before warm starts were split units) on shards split by blocks is refused: it trained on whole
        streams, their held-out blocks included (unless the base holds nothing out: heldout-fraction 0)."""
        from rpt_train.rundir import read_saved

        warm = self.root / "warm"
        record = read_saved(done, f"delete '{warm}' to rebuild the warm start")
        blocks = split_blocks(base) if "split_block_windows" in record else None  # older: not checked
        if "units" not in record:
            try:
                by_blocks = split_blocks(base) if blocks is None else blocks
            except UserError:  # shards unreadable here: the arms that read them stop with their own message
                by_blocks = 0
            if by_blocks > 0 and (base.heldout_fraction or 0) > 0:  # nothing held out: nothing trained on
                raise UserError(f"spec '{self.spec.path}': the warm start in '{warm}' was made before warm starts "
                                f"were split by blocks (its warm.json records no units), so on these shards, held "
                                f"out by blocks of {by_blocks} windows, it trained on whole streams, held-out blocks "
                                f"included; delete '{warm}' to rebuild it")
        now = {**self.spec.warm, **warm_base(base, blocks)}
        changed = [k for k in now if k in record and record[k] != now[k]]
        if changed:
            was = "; ".join(f"{k}: {record[k]!r} there, {now[k]!r} now" for k in changed)
            raise UserError(f"spec '{self.spec.path}': the warm start in '{warm}' was made with other options "
                            f"({was}); delete '{warm}' (or use another out:) to rebuild it, or restore the spec's "
                            "warm: / base: values")
        return record

    def warm_start(self) -> dict | None:
        """SFT on the warm units (neither held out nor trained on by any arm: a second hash of the split unit, the
        document or, for a split by blocks, its block of windows) into OUT/warm/train/model; OUT/warm/docs.txt lists
        them, OUT/warm/rest.txt the units neither warm nor held out (the warm SFT excludes those and keeps the base's
        split: it never trains on held-out text, labels included). Done when its model and warm.json exist, made
        with the spec's warm: options and base shards and model (check_warm: a change is refused). Several
        processes (one per GPU, each running arms of one spec) build it once: the first holds OUT/warm/.lock (an
        flock, released when it is done or its process dies), the others wait for it and then reuse its warm start."""
        if not self.spec.warm:
            return None
        waiting = "warm start: another process ({holder}) is building it (lock {lock}); waiting"
        with exclusive(self.root / "warm" / ".lock", waiting) as (_, unlocked):
            # without flock, said by _warm_start when it builds (not on each arm that reuses the warm start)
            return self._warm_start(unlocked and f"warning: {unlocked}: the warm start is built unlocked; start "
                                    "the other processes after it is done")

    def _warm_start(self, unlocked: str | None = None) -> dict:
        """warm_start's work, under its lock (`unlocked`: the warning to print before building, when flock failed)."""
        from rpt_train.samples import ShardSet, is_heldout, read_doc_ids
        from rpt_train.sft import next_contexts, sft_train
        from rpt_train.trainer import OptionsChanged

        w, done = self.spec.warm, self.root / "warm" / "warm.json"
        base = load_config(TrainConfig, None, {k: v for k, v in self.spec.train.items()
                                               if k in field_types(TrainConfig)})
        if done.exists() and (self.root / "warm" / "train" / "model" / "config.json").exists():
            return self.check_warm(done, base)
        if unlocked:
            print(unlocked, file=sys.stderr)
        shards = ShardSet(base.shards)
        blocks = split_blocks(base, shards)
        units = split_units(shards, blocks)  # unit -> its document
        held = {u for u in units if is_heldout(u, base.heldout_fraction, base.split_seed)}
        user = read_doc_ids(base.exclude_docs)  # never trained on: no warm unit is in it (nor its document)
        chosen = [u for u in units if u not in held and u not in user and units[u] not in user
                  and is_heldout(u, w["fraction"], base.split_seed + 1)]
        if not chosen:
            what = f"block of {blocks} windows" if blocks else "document"
            raise UserError(f"spec '{self.spec.path}': no {what} falls in the warm fraction {w['fraction']}; "
                            "raise warm: fraction")
        # the arms exclude docs.txt: the warm units and the user's own list (none given: the warm units alone)
        write_lines(chosen + (sorted(user) if base.exclude_docs else []), self.root / "warm" / "docs.txt")
        picked = set(chosen)
        write_lines([u for u in units if u not in held and u not in picked], self.root / "warm" / "rest.txt")
        cfg = load_config(TrainConfig, None, {**to_dict(base), "exclude_docs": str(self.root / "warm" / "rest.txt"),
                                              "out": str(self.root / "warm" / "train"), "steps": w["steps"],
                                              "batch_prompts": w["batch"], "lr": w["lr"], "warmup_steps": 0,
                                              "lr_schedule": "constant", "save_every": min(8, w["steps"]),
                                              # the base's bucket, as before sft read a curriculum (an RL schedule)
                                              "curriculum": [], "curriculum_steps": [],
                                              # the base's split keeps the held-out units out (rest.txt: the
                                              # others): the positions of the warm units, and no labels that run
                                              # into a held-out window
                                              "split_block_windows": blocks})
        t0 = time.perf_counter()
        try:
            totals = sft_train(cfg, next_contexts(w["batch"]))
        except OptionsChanged as e:  # its options are this spec's, not the user's: say how to rebuild it
            raise UserError(f"spec '{self.spec.path}': its warm start in '{cfg.out}' was checkpointed under other "
                            f"options ({e.details}; e.g. by an older version, without the "
                            f"held-out split); delete '{self.root / 'warm'}' to rebuild it") from None
        from rpt_train.sft import read_jsonl

        metrics = read_jsonl(Path(cfg.out) / "metrics.jsonl")
        record = {"documents": len({units[u] for u in chosen}), "units": len(chosen),
                  "heldout_documents": len({units[u] for u in held}), "all_documents": len(set(units.values())), **w,
                  **warm_base(base, blocks, user),
                  "seconds": round(time.perf_counter() - t0, 1), "machine": machine(),
                  "sft": totals, "compute": compute_of(metrics, self.params(base.model)),
                  "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"]}
        write_json(record, done)
        keep_copy(done, self.kept / "warm.json")
        return record

    def measure_levers(self, rerun: bool = False) -> Path | None:
        """The `levers` stage, once: RESULTS/NAME.arms/levers.json (rpt_train/levers.py); under the flock
        OUT/levers.lock, as an arm (run_arm): None when another process holds it."""
        with self.arm_locked("levers", rerun) as go:
            return self._measure_levers(rerun) if go else None

    def _measure_levers(self, rerun: bool) -> Path:
        from rpt_train.levers import measure_levers

        path = self.kept / "levers.json"
        if path.exists() and (not rerun or self.since_start(path)):
            print(f"levers: done ({path})")
            return path
        warm = self.warm_start()
        base = load_config(TrainConfig, None, {k: v for k, v in self.spec.train.items()
                                               if k in field_types(TrainConfig)})
        models = {"base": base.model} | ({"warm-started": self.start_model()} if warm else {})
        result = measure_levers(models, self.eval_config(base.model), base.group_size, base.response_prefix,
                                self.spec.levers["positions"])
        write_json(result, path)
        return path

    def since_start(self, path: Path) -> bool:
        """Whether `path` was written (a folder: made, or an entry added) since this process started: by another
        process running this spec's arms in this round (--rerun keeps it: run_arm)."""
        try:
            return path.stat().st_mtime >= self.started
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def arm_locked(self, name: str, rerun: bool = False):
        """Yields whether this process may run arm `name` (or the levers stage): it holds its flock (arm_lock) for
        the block; False when another process holds it (said on stdout: this one goes on to the next arm). So the
        same spec started once per GPU shares out its arms as a queue, and no two processes resume one checkpoint
        or append to one metrics.jsonl (compute_of would count its FLOPs twice)."""
        lock = arm_lock(self.spec, name)
        with exclusive(lock) as (holder, unlocked):
            if holder:
                print(f"{name}: skipped: another process ({holder}) is running it (lock '{lock}')"
                      + ("; the record it writes counts as rerun (a process started with --rerun after it has "
                         "ended would run it over again)" if rerun else ""), flush=True)
            elif unlocked:
                print(f"warning: {unlocked}: {name} runs unlocked; run it in no other process at the same time",
                      file=sys.stderr)
            yield holder is None

    def check_record(self, name: str) -> None:
        """Refuses arm `name`'s kept record when its eval_config differs from the eval the spec now gives the arm
        (its design and the arm's own eval: section; eval_differences: every key but EVAL_RUNTIME): it would count
        as done, and be reported, as if evaluated so. A record without eval_config (older versions): not checked."""
        from rpt_common.shards import shards_identity

        path = self.record_path(name)
        record = json.loads(path.read_text())
        there = record.get("eval_config")
        if not isinstance(there, dict):
            return
        now = to_dict(self.eval_config("demo", self.spec.arms[name]))
        keys = eval_differences(there, now, same_shards=same_shards(shards_of(record), shards_identity(now["shards"])))
        if keys:
            raise UserError(f"spec '{self.spec.path}', arm '{name}': its record '{path}' was evaluated with other "
                            "eval settings than the spec now gives it (" + "; ".join(
                                f"{k.replace('_', '-')}: {there[k]!r} there, {now[k]!r} now" for k in keys)
                            + "); it would count as done and be reported as if evaluated so. Run it over: "
                            f"`rpt-train experiment {self.spec.path} {name} --rerun` (or restore the spec's values)")

    def run_arm(self, name: str, rerun: bool = False) -> Path | None:
        """Train (by its kind) and evaluate one arm, unless its record is kept already (made with the eval the spec
        now gives it: check_record); the record is written the moment the arm finishes, with the metrics (and a
        trainer's contexts) beside it. Under the arm's flock (arm_locked): None when another process runs it, or
        an arm it depends on."""
        with self.arm_locked(name, rerun) as go:
            return self._run_arm(name, rerun) if go else None

    def _run_arm(self, name: str, rerun: bool) -> Path | None:
        arm, path = self.spec.arms[name], self.record_path(name)
        if rerun and not self.since_start(path):
            path.unlink(missing_ok=True)
            if not self.since_start(self.root / name):
                shutil.rmtree(self.root / name, ignore_errors=True)
        elif rerun:
            print(f"{name}: done since this process started, by another one ({path}): not run again")
            return path
        elif path.exists():
            self.check_record(name)
            print(f"{name}: done ({path})")
            return path
        for dep in arm.depends_on():
            holder = None if self.record_path(dep).exists() else lock_holder(arm_lock(self.spec, dep))
            if holder:
                print(f"{name}: skipped: it needs arm '{dep}', which another process ({holder}) is running; a "
                      f"process running every arm takes '{name}' after it (else run it when '{dep}' is done)",
                      flush=True)
                return None
        self.warm_start()
        kind = ARM_KINDS[arm.kind]
        t0 = time.perf_counter()
        model, facts = kind.run(self, arm)
        train_wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = run_eval(self.eval_config(model, arm))
        eval_seconds = time.perf_counter() - t1
        work = self.root / name / "train"
        from rpt_train.sft import read_jsonl

        metrics = read_jsonl(work / "metrics.jsonl") if kind.trains else []
        n = self.params(model)
        compute = compute_of(metrics, n)
        # seconds: the training steps of every session that ran (a resumed arm's too) + this evaluation
        train_seconds = compute["train_seconds"] if metrics else train_wall
        compute |= {"params": n, "eval_seconds": round(eval_seconds, 1),
                    "seconds": round(train_seconds + eval_seconds, 1), "machine": machine()}
        record = {"arm": name, "kind": arm.kind, "options": arm.options, "match_flops": arm.match_flops,
                  "contexts_of": arm.contexts_of, "model": model, "eval": result, "compute": compute,
                  "train_config": None, **facts, "eval_config": to_dict(self.eval_config(model, arm)),
                  "spec": self.spec.path}
        if metrics:
            keep_copy(work / "metrics.jsonl", self.kept / f"{name}.metrics.jsonl")
        keep_copy(work / "contexts.jsonl", self.kept / f"{name}.contexts.jsonl")
        write_json(record, path)
        print(f"{name}: " + ", ".join(f"{b} {result[b]['ntr_accuracy']:.3f}" for b in ("easy", "medium", "hard", "all")
                                      if result[b]["ntr_accuracy"] is not None) + f" -> {path}", flush=True)
        return path


def run_eval(cfg: EvalConfig) -> dict:
    """The held-out evaluation of one model, with every position's outcomes (the report pairs arms on them)."""
    from rpt_train.evaluate import evaluate
    from rpt_train.policy import eos_ids, load_policy
    from rpt_train.rollout import HFRollout, autocast_bf16
    from rpt_train.trainer import seed_everything

    seed_everything(cfg.seed)
    policy = load_policy(cfg.model, cfg.device, cfg.dtype)
    engine = HFRollout(policy.model, policy.tokenizer, eos_ids(policy), cfg.rollout_batch_size)
    with autocast_bf16(next(policy.model.parameters()).device):
        return evaluate(policy.model, policy.tokenizer, engine, cfg, details=True)


def split_units(shards, block_windows: int) -> dict[str, str]:
    """Every held-out split unit of the ShardSet `shards` (samples.split_unit of a row's doc_id and window_index:
    the document, or its block of `block_windows` windows), each with its document; by document, then block."""
    import pyarrow.parquet as pq

    from rpt_train.samples import split_unit

    seen: set[tuple[str, int]] = set()
    for path in shards.paths:
        table = pq.read_table(path, columns=["doc_id", "window_index"])
        blocks = [w // block_windows if block_windows > 0 else 0 for w in table.column("window_index").to_pylist()]
        seen.update(zip(table.column("doc_id").to_pylist(), blocks))
    return {split_unit(d, b * block_windows, block_windows): d for d, b in sorted(seen)}


def write_lines(lines: list[str], path: Path) -> None:
    """`lines`, one a line, at `path`, atomically (evaluate.replace_atomically)."""
    from rpt_train.evaluate import replace_atomically

    replace_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))


def write_json(obj: dict, path: Path) -> None:
    from rpt_train.evaluate import write_json as _write

    _write(obj, path)


def keep_copy(path: Path, keep: Path) -> None:
    """A copy of `path` at `keep`, atomically, through a temp file of this call's own (processes, one per GPU, may
    keep the same file at once)."""
    from rpt_train.evaluate import replace_atomically

    if path.exists():
        replace_atomically(keep, lambda tmp: shutil.copyfile(path, tmp))


def stages(spec: Spec, arms: list[str] | None) -> tuple[bool, list[str] | None]:
    """(whether to run the levers stage, the arms asked: None = all): `levers` in the list is the stage."""
    if not arms:
        return spec.levers is not None, None
    if "levers" in arms and spec.levers is None:
        raise UserError(f"spec '{spec.path}' has no `levers:` section to run")
    return "levers" in arms, [a for a in arms if a != "levers"]
