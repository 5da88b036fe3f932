"""Typed configs for `rpt-train run` and `rpt-train eval`: one source of defaults, loaded from a YAML
recipe (keys with `-` or `_`, optional `run:` / `eval:` sections) and overridden by the command line."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field


from rpt_common.errors import UserError
from rpt_common.recipe import read_yaml

BUCKETS = ("easy", "medium", "hard")
INHERITED_SPLIT = "the run's own when --model is a `rpt-train run` directory or one of its checkpoints, else"
LOSSES = ("grpo", "dr_grpo", "dapo")
# Options a --resume may change when --allow-changed names them: read afresh at every step, so the new value holds
# from the resumed step on (--lr: the schedule's base, rpt_train.trainer.resume); the run records each change.
RESUME_CHANGEABLE = ("lr", "grad_clip")
CHANGEABLE_FLAGS = ", ".join(n.replace("_", "-") for n in RESUME_CHANGEABLE)


def opt(default, help: str, **kw):
    """A config field with its help text (shown by `--help` and in docs/cli.md)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(kw_only=True, slots=True)
class CommonConfig:
    """What training and evaluation share: data, prompt, sampling and device."""

    shards: str = opt("", "`rpt-data tag` output directory (manifest.json + shard-*.parquet)")
    model: str = opt("demo", "policy: HF model directory, .gguf file, `demo`, or a `rpt-train run` --out dir (latest checkpoint)")
    entropy_metric: str | None = opt(None, "per-position statistic that buckets use: topk_entropy or entropy (nats); "
                                     "default: the one the shards were tagged with (manifest metric topk or full)")
    bucket_thresholds: list[float] | None = opt(None, "entropy thresholds of easy,medium,hard (nested: above each); "
                                                "default: the shards' manifest buckets (0.5,1.0,1.5 when it has none)")
    heldout_fraction: float | None = opt(None, "fraction of documents (seeded hash of doc_id) held out of training "
                                         f"for eval: {INHERITED_SPLIT} 0")
    split_seed: int | None = opt(None, f"seed of the held-out document split: {INHERITED_SPLIT} 0")
    split_block_windows: int | None = opt(None, "held-out unit of continuous shards (one stream per file): blocks of "
                                          "N consecutive windows of a stream, 0 = whole documents; default: "
                                          f"{INHERITED_SPLIT} 16 for continuous shards, 0 for structured ones")
    labels_length: int = opt(8, "ground-truth tokens (policy tokenizer) whose boundaries count for prefix match")
    max_context_tokens: int = opt(0, "keep only the last N policy tokens of the context (0 = whole row)")
    template: str = opt("v0", "prompt template: v0, think-brief, answer-only, or a file containing {context}")
    chat_template: str = opt("auto", "apply the tokenizer's chat template: auto (when it has one), on, off")
    response_prefix: str = opt("", "text the response starts with, written into the prompt after the chat template's "
                               "assistant turn (e.g. '\\boxed{' with answer-only) and put back in front of every "
                               "completion before its answer is extracted")
    answer_format: str = opt("boxed", "answer format: boxed (last \\boxed{} after </think>) or answer_tag")
    max_new_tokens: int = opt(8192, "completion budget in tokens (paper: 8k)")
    temperature: float = opt(0.8, "sampling temperature (paper: 0.8); log-probs use the same temperature")
    top_p: float = opt(1.0, "nucleus sampling mass (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    rollout_batch_size: int = opt(0, "sequences per generate call (0 = all at once), in whole groups of one "
                                  "prompt's completions (--group-size; eval: --samples), one group at least")
    static_cache: bool = opt(False, "decode with a preallocated static KV cache (compiled on CUDA) instead of the "
                             "dynamic one whose finished rows leave; off until measured on a GPU")
    seed: int = opt(0, "seed of sampling order, rollouts and everything random")
    device: str = opt("auto", "auto, cpu or cuda")
    dtype: str = opt("float32", "compute dtype: float32, bfloat16, float16 or auto (bf16 on CUDA). `run` trains "
                     "float32 master weights and AdamW state whatever this says and computes under autocast to it "
                     "(FSDP2: all-gathers in it); `eval` loads the weights in it")

    def __post_init__(self):
        inherit_split(self)


@dataclass(kw_only=True, slots=True)
class SampleConfig(CommonConfig):
    """Which positions `run` trains on and `export` writes (one source for both)."""

    bucket: str = opt("selected", "positions drawn: selected (the tagger's threshold), easy, medium, hard, all")
    min_entropy: float | None = opt(None, "positions whose entropy exceeds X nats (overrides --bucket)")
    exclude_docs: str = opt("", "text file of doc_ids or split units (doc_id#block, a block of "
                            "--split-block-windows windows) one per line, never trained on or exported, e.g. a warm "
                            "start's or a benchmark's documents")


@dataclass(kw_only=True, slots=True)
class TrainConfig(SampleConfig):
    """`rpt-train run`: RPT with the GRPO family on prebuilt shards (defaults follow the paper, Sec. 3-4)."""

    out: str = opt("out/train", "output directory: metrics.jsonl, samples.jsonl, checkpoints/, eval/, run.json")
    steps: int = opt(1000, "training steps (one rollout batch each)")
    batch_prompts: int = opt(32, "contexts per step (paper: 256)")
    group_size: int = opt(8, "rollouts per context, G (paper: 8)")
    reward_correct: float = opt(1.0, "reward of a prefix-matching answer")
    reward_wrong: float = opt(0.0, "reward of a wrong answer")
    reward_no_answer: float = opt(0.0, "reward when no answer can be extracted (paper: 0, not a penalty)")
    reward: list[str] = opt([], "extra reward functions added to the RPT reward: `format` or module:function (repeatable)")
    objective: str = opt("rpt", "rpt (prefix-match reward of a boxed answer) or rlp (information gain of a sampled "
                         "thought: log p(true next tokens | context, thought) under the policy minus log p(same | "
                         "context) under an EMA copy; loss on thought tokens only; see docs/training.md)")
    think_budget: int = opt(0, "thinking budget in tokens (0 = none: --max-new-tokens per completion). rpt: each "
                            "rollout writes at most budget + --answer-room tokens and one that never closes "
                            "</think> gets the no-answer reward (use --template think); rlp: the thought's length")
    think_budget_final: int | None = opt(None, "budget reached after --think-decay-steps steps (linear; default: "
                                         "--think-budget, no decay)")
    think_decay_steps: int = opt(0, "steps over which the budget moves from --think-budget to --think-budget-final")
    answer_room: int = opt(16, "with --think-budget (rpt): tokens after the budget for </think> and the answer")
    think_overflow: str = opt("fail", "with --think-budget (rpt), a rollout without </think> in its first budget "
                              "tokens: fail (the no-answer reward) or close (budget forcing, as s1: the thought is "
                              "cut at the budget, --think-close is appended and the policy writes --answer-room "
                              "more tokens; the forced tokens get no loss; see docs/training.md)")
    think_close: str = opt("auto", "with --think-overflow close: the forced text, starting with </think>; auto = "
                           "</think>, a newline, then --answer-format's opening ('\\boxed{' or '<answer>')")
    ntp_weight: float = opt(0.0, "weight of a next-token cross-entropy on each trained context (its tokens up to "
                            "the true next token, raw text) added to the RL loss (0 = off)")
    ema_rate: float = opt(0.999, "rlp: EMA copy <- rate x EMA + (1 - rate) x policy after every optimizer step")
    rlp_tokens: int = opt(1, "rlp: true continuation tokens scored by the reward (1 = the next token, as the "
                          "paper; at most --labels-length)")
    curriculum: list[str] = opt([], "buckets drawn from in order over the steps, e.g. easy,medium,hard (overrides "
                                "--bucket; boundaries in --curriculum-steps)")
    curriculum_steps: list[int] = opt([], "last step of each --curriculum bucket but the final one, e.g. 36,72")
    loss: str = opt("grpo", "grpo (z-score, sequence mean), dr_grpo (no std, constant norm), dapo (z-score, token mean)")
    scale_rewards: bool | None = opt(None, "divide advantages by the group std (default: by --loss)")
    advantage_anchor: float | None = opt(None, "add a phantom rollout with this reward to each group's mean/std")
    clip_low: float = opt(0.2, "lower clip epsilon of the ratio")
    clip_high: float | None = opt(None, "upper clip epsilon (clip-higher; default 0.28 for dapo, else --clip-low)")
    beta: float = opt(0.0, "k3 KL weight to the frozen initial model (0 = no reference model loaded; paper: 0)")
    dynamic_sampling: bool = opt(True, "refill the batch with groups whose rewards differ (DAPO)")
    max_sampling_rounds: int = opt(4, "rollout rounds per step at most when refilling")
    sampler: str = opt("uniform", "how contexts are drawn: uniform (seeded order), or learnability (of a pool of "
                       "--sampler-pool x the contexts needed, those whose G rollouts the policy is least likely to "
                       "answer all alike, from one forward over the pool's prompts; needs --response-prefix "
                       "'\\boxed{'; see docs/training.md)")
    sampler_pool: int = opt(4, "with --sampler learnability: contexts scored per context rolled out")
    lr: float = opt(1e-6, "AdamW learning rate (paper: 1e-6)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear warmup steps")
    lr_schedule: str = opt("constant", "after warmup: constant, linear or cosine decay to 0")
    grad_clip: float = opt(1.0, "max gradient norm (0 = off)")
    on_bad_step: str = opt("skip", "a NaN/inf loss or gradient (or one above --bad-grad-norm): skip (drop the batch, "
                           "log it, go on) or stop (exit; the last checkpoint stays intact)")
    bad_grad_norm: float = opt(0.0, "also treat an update whose pre-clip gradient norm exceeds this as bad (0 = only NaN/inf)")
    max_bad_steps: int = opt(10, "stop after this many bad steps in a row, even with --on-bad-step skip")
    ppo_epochs: int = opt(1, "passes over each rollout batch")
    mini_batch_size: int = opt(0, "sequences per optimizer update (0 = the whole batch)")
    micro_batch_size: int = opt(4, "sequences per forward/backward (gradient accumulation); with --share-prefix, "
                                "groups (each one packed row of a context and its completions)")
    share_prefix: bool = opt(True, "compute each context once per group in the update (one packed row with a block "
                             "mask); same losses and gradients; families or lengths where it cannot pay run unshared")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    rollout_gather: str = opt("auto", "under torchrun: on = generate with the full weights gathered once per rollout "
                              "call (needs the whole model on each device), off = FSDP's per-layer all-gather at "
                              "every decoded token; auto = on when the memory plan says the gathered copy fits "
                              "(`rpt-train plan` shows the choice and why)")
    bf16: bool = opt(True, "bf16 autocast on CUDA with --dtype float32 (ignored on CPU); weights stay float32")
    logprob_chunk_tokens: int = opt(1024, "completion tokens per lm_head chunk of the log-prob/entropy pass "
                                    "(extra memory ~ 4 x chunk x vocab x 4 bytes, never the full [B, C, V])")
    device_memory: float = opt(0.0, "GiB per device for the memory plan (0 = the CUDA device's own; on CPU the "
                               "machine's memory, and a plan beyond it only warns unless this is given)")
    save_every: int = opt(100, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = opt(3, "keep the last K checkpoints")
    eval_every: int = opt(0, "evaluate on held-out positions every N steps (0 = off)")
    eval_limit: int = opt(32, "positions per bucket for --eval-every")
    eval_samples: int = opt(1, "samples per position for --eval-every")
    log_samples_every: int = opt(10, "write rollouts to samples.jsonl every N steps (0 = off)")
    tensorboard: bool = opt(False, "also log to OUT/tensorboard (needs the tensorboard package)")
    resume: bool = opt(False, "continue from the latest checkpoint in --out")
    allow_changed: list[str] = opt([], "with --resume: options that may differ from the checkpoint's, of "
                                   f"{CHANGEABLE_FLAGS} (e.g. `--resume --allow-changed lr --lr 5e-7` "
                                   "after a stop for bad steps; repeatable or comma-separated): the new value holds "
                                   "from the resumed step on (--lr is the schedule's new base: warmup and decay go "
                                   "on), and run.json's `changes` records each change with its step")

    def resolved_clip_high(self) -> float:
        return self.clip_high if self.clip_high is not None else (0.28 if self.loss == "dapo" else self.clip_low)

    def resolved_scale_rewards(self) -> bool:
        return self.scale_rewards if self.scale_rewards is not None else self.loss != "dr_grpo"


@dataclass(kw_only=True, slots=True)
class EvalConfig(CommonConfig):
    """`rpt-train eval`: next-token-reasoning accuracy per entropy bucket, beside greedy next-token accuracy."""

    out: str = opt("", "write the results as JSON to this file (default: print only)")
    limit: int = opt(100, "positions per bucket")
    samples: int = opt(4, "samples per position (ntr_pass_at_k uses all, ntr_accuracy the first)")
    split: str = opt("auto", "documents to evaluate: heldout, train, all; auto = heldout when the (inherited) "
                     "--heldout-fraction is > 0")
    baseline: str = opt("", "also evaluate this model (e.g. the run's base) on the same positions with the same "
                        "prompt, and report the paired differences (interval, p-value) per bucket")
    think_overflow: str = opt("fail", "fail (completions as generated, --max-new-tokens) or close (as a run with "
                              "--think-overflow close: each completion writes --think-budget + --answer-room tokens, "
                              "and one without </think> in its first --think-budget tokens is cut there, "
                              "--think-close is appended and --answer-room more tokens are written); this, the "
                              "three below and --max-new-tokens default to the run's in-run evals' when --model is a "
                              "`rpt-train run` (or checkpoint): what its last step generated (fail: --max-new-tokens "
                              "= its last budget + --answer-room)")
    think_budget: int = opt(0, "with --think-overflow close: the thinking budget in tokens (a run's: the one at its "
                            "last step, also from a recipe's top-level --think-budget-final/--think-decay-steps)")
    answer_room: int = opt(16, "with --think-overflow close: tokens written after the budget or the forced text")
    think_close: str = opt("auto", "with --think-overflow close: the forced text, starting with </think>; auto = "
                           "</think>, a newline, then --answer-format's opening ('\\boxed{' or '<answer>')")


@dataclass(kw_only=True, slots=True)
class ExportConfig(SampleConfig):
    """`rpt-train export`: the samples `run` would draw, in verl, TRL or OpenRLHF dataset format (train, held-out)."""

    format: str = opt("", "dataset format: verl (RL parquet), trl (GRPOTrainer parquet) or openrlhf (jsonl)")
    out: str = opt("", "output directory: train and heldout files, export.json (from the command line only)")
    limit: int = opt(0, "training samples at most (0 = one pass over every training position, in `run`'s order)")
    heldout_limit: int = opt(0, "held-out samples at most (0 = all); needs --heldout-fraction > 0")
    batch_rows: int = opt(1024, "samples built and written per batch (bounds memory)")
    overwrite: bool = opt(False, "replace an earlier export in --out")
    progress: bool = opt(True, "show a progress bar on stderr")
    # The run's reward, carried in every row (a `run` recipe's keys) so that the engine's reward equals run's
    reward_correct: float = opt(1.0, "reward of a prefix-matching answer (carried in each row's label)")
    reward_wrong: float = opt(0.0, "reward of a wrong answer (carried in each row's label)")
    reward_no_answer: float = opt(0.0, "reward when no answer can be extracted (carried in each row's label)")
    think_budget: int = opt(0, "the run's thinking budget: > 0 makes the engine's reward give a completion without "
                            "</think> the no-answer reward, as `run` does (the budget itself is the engine's "
                            "response length)")


def field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base(tp):
    """(base type, optional) of `X | None` annotations."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def coerce(name: str, tp, value):
    """Check/convert one recipe or CLI value to the field's type, or say what was expected."""
    base, optional = _base(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"config key '{name}' cannot be null")
    try:
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [item(v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is float and isinstance(value, bool) or base is int and isinstance(value, float):
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        expected = getattr(base, "__name__", str(base))
        raise UserError(f"config key '{name}' expects {expected}, got {value!r}")


def _type_name(base) -> str:
    if typing.get_origin(base) is list:
        return "a list of " + _type_name(typing.get_args(base)[0])
    return getattr(base, "__name__", str(base))


def saved_value(name: str, tp, value):
    """One value of a run's saved file (config.yaml, trainer_state.json) as the field's type, or ValueError saying
    what was expected. Stricter than `coerce`, which reads text: a saved file holds typed YAML/JSON, so a value of
    another type (`template: 7`, `temperature: hot`, `top_p: [1]`) is damage, not a spelling; an int is a float;
    a bool --rollout-gather is a run's from before `auto` (validate maps it)."""
    base, optional = _base(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"'{name}' cannot be null")

    def one(base, value):
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (bool, str) and isinstance(value, base):
            return value
        if name == "rollout_gather" and isinstance(value, bool):
            return value
        raise ValueError

    try:
        if typing.get_origin(base) is list:
            if not isinstance(value, (list, tuple)):  # a tuple: trainer_state.pt keeps what the config held
                raise ValueError
            return [one(typing.get_args(base)[0], v) for v in value]
        return one(base, value)
    except ValueError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ValueError(f"'{name}' should be {_type_name(base)}{' or null' if optional else ''}, "
                         f"got {shown}") from None


def saved_options(path: Path, data: dict, hint: str) -> dict:
    """The `rpt-train run` options in `data` (read from `path`), each converted to its option's type (a value that is
    not one is a UserError naming the file and the key). Keys that are no option of this version (from a newer or
    older one) are ignored, not refused: a run directory outlives the code that wrote it; so is a null budget option
    (RUN_GENERATION) that cannot be null, as rpt_train.config.inherit_prompt always read it: not recorded."""
    types = field_types(TrainConfig)
    out = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in RUN_GENERATION and value is None and key != "think_budget_final":
            continue
        if key in types:
            try:
                out[key] = saved_value(key, types[key], value)
            except ValueError as e:
                raise UserError(f"'{path}' is damaged: {e}; {hint}") from None
    return out


def _norm(d: dict) -> dict:
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def load_config(cls, recipe: str | None = None, overrides: dict | None = None):
    """cls() <- recipe (flat keys, then its `run:`/`train:` or `eval:` section) <- CLI overrides (not None)."""
    types_ = field_types(cls)
    others = set(field_types(TrainConfig)) | set(field_types(EvalConfig)) | set(field_types(ExportConfig))
    others |= {"run", "train", "eval", "tag", "export", "warm"}  # warm: the power pipeline's warm start
    section = ("eval",) if cls is EvalConfig else ("run", "train", "export") if cls is ExportConfig else ("run", "train")
    raw = _norm(read_yaml(recipe))
    values: dict = {}
    layers = [{k: v for k, v in raw.items() if k not in ("run", "train", "eval", "tag", "export", "warm")}]
    layers += [_norm(raw[s]) for s in section if isinstance(raw.get(s), dict)]
    given = set()  # eval: set by its section or the command line (a top-level key of RUN_OPTIONS is the run's)
    for i, layer in enumerate(layers):
        for key, value in layer.items():
            if key in types_:
                values[key] = coerce(key, types_[key], value)
                given |= {key} if i or cls is not EvalConfig or key not in RUN_OPTIONS else set()
            elif key not in others:
                raise UserError(f"recipe '{recipe}' has an unknown key '{key}'; see `rpt-train --help`")
    for key, value in _norm(overrides or {}).items():
        if value is not None and value != ():
            values[key] = coerce(key, types_[key], value)
            given.add(key)
    cfg = cls(**values)
    if cls is EvalConfig:
        train_types = field_types(TrainConfig)
        recipe_run = {k: coerce(k, train_types[k], v) for k, v in layers[0].items()
                      if k in RUN_GENERATION + PROMPT_OPTIONS + SAMPLING_OPTIONS}
        inherit_prompt(cfg, given, recipe_run)
    validate(cfg)
    return cfg


PROMPT_OPTIONS = ("template", "chat_template", "response_prefix", "max_context_tokens", "answer_format")
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")  # an eval of a run samples as its in-run evals did
EVAL_GENERATION = ("think_overflow", "think_close", "answer_room", "think_budget", "max_new_tokens")  # budget.py's
RUN_GENERATION = EVAL_GENERATION + ("think_budget_final", "think_decay_steps", "steps", "objective")  # its sources
RUN_OPTIONS = PROMPT_OPTIONS + SAMPLING_OPTIONS + EVAL_GENERATION  # an eval of a run takes these from the run


def inherit_prompt(cfg, given: set[str], recipe_run: dict | None = None) -> None:
    """An eval of a `rpt-train run` directory (or checkpoint) prompts, samples and generates as the run's own
    --eval-every evals did: its PROMPT_OPTIONS and SAMPLING_OPTIONS from its config.yaml, and EVAL_GENERATION as
    rpt_train.budget.eval_generation derives them from the run's options. The run's config.yaml is what it ran
    with (its recipe under its command-line overrides), so it wins over the recipe's top-level keys `recipe_run`
    (read as `rpt-train run` reads them), which count only for a model that is no run (demo) or for keys an older
    config.yaml lacks; options `given` in the eval: section or on the command line win over both. What is taken
    and which recipe keys the run's config.yaml overrode are noted on stderr."""
    import os
    import sys
    from pathlib import Path

    from rpt_train.budget import eval_generation, eval_rule, new_tokens, think_budget
    from rpt_train.rundir import _STEP_DIR, list_checkpoints, read_run_config, run_dir_of

    recipe_run = recipe_run or {}
    saved = dict(read_run_config(cfg.model, convert=saved_options))
    train_types = field_types(TrainConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in RUN_GENERATION}
    saved_run = {k: coerce(k, train_types[k], v) for k, v in saved.items()
                 if k in RUN_GENERATION and (v is not None or k == "think_budget_final")}
    saved_prompt = {k: saved[k] for k in PROMPT_OPTIONS + SAMPLING_OPTIONS if k in saved}
    overridden = [k for k, v in recipe_run.items() if k not in given and
                  k in (saved_run if k in RUN_GENERATION else saved_prompt) and
                  (saved_run if k in RUN_GENERATION else saved_prompt)[k] != v]
    run = defaults | {k: v for k, v in recipe_run.items() if k in RUN_GENERATION} | saved_run
    schedule = types.SimpleNamespace(**run)  # the run's own, before the eval's options
    run |= {k: getattr(cfg, k) for k in EVAL_GENERATION if k in given}
    if "think_budget" in given:  # the eval's budget as given: no schedule
        run |= {"think_budget_final": None, "think_decay_steps": 0}
    wanted = saved_prompt | eval_generation(types.SimpleNamespace(**run))
    taken = [k for k in wanted if k not in given and wanted[k] != getattr(cfg, k)]
    for k in taken:
        setattr(cfg, k, wanted[k])
    said = [f"--{k.replace('_', '-')} {wanted[k]!r}" for k in taken if k != "max_new_tokens" or
            cfg.think_overflow != "close"]  # close writes --think-budget + --answer-room whatever this says
    if overridden:
        said.append("over the recipe's top-level " + ", ".join(
            f"--{k.replace('_', '-')} {recipe_run[k]!r}" for k in overridden) + " (the run's config.yaml is what "
            "it ran with: its recipe under its command-line overrides; put an option in the recipe's eval: "
            "section or on the command line to change it)")
    run_dir = run_dir_of(cfg.model) if saved else None
    step = _STEP_DIR.match(Path(cfg.model).name) if run_dir is not None else None
    checkpoint = bool(step) and Path(cfg.model).parent.name == "checkpoints"
    # the run directory itself: its latest checkpoint's weights, which may be from before the run's last step
    latest = list_checkpoints(run_dir)[-1:] if run_dir is not None and not checkpoint else []
    if (checkpoint or latest) and schedule.think_budget > 0:
        option = "think_budget" if cfg.think_overflow == "close" else "max_new_tokens"
        budget_at = think_budget if option == "think_budget" else new_tokens
        flag = "--" + option.replace("_", "-")
        if option not in given and checkpoint:
            at = budget_at(schedule, int(step.group(1)))
            said.append(f"a checkpoint is evaluated at the run's last-step budget, as its in-run evals are "
                        f"({step.group(0)} trained at {flag} {at}: pass {flag} {at} to evaluate at that)")
        elif option not in given and latest[0][0] < int(schedule.steps):  # stopped before its last step
            at = budget_at(schedule, latest[0][0])
            if at != budget_at(schedule, max(1, int(schedule.steps))):
                said.append(f"the run stopped at {latest[0][1].name} of its {schedule.steps} steps, and its weights "
                            f"there are evaluated at the budget of its last step ({latest[0][1].name} trained at "
                            f"{flag} {at}: pass {flag} {at} to evaluate at that)")
    if said and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once
        source = (f"the run '{run_dir}' did at its last step" if saved else "the recipe's run options give at "
                  "their last step" if recipe_run else "the budget gives (--think-budget + --answer-room)")
        print(f"note: evaluating as {source} (completions {eval_rule(cfg)}): {', '.join(said)}", file=sys.stderr)


def inherit_split(cfg) -> None:
    """Fill an unset (None) --heldout-fraction / --split-seed in place (every config does on construction): from the
    run's provenance when --model is a `rpt-train run` directory or one of its checkpoints, so eval and export (and
    a run that starts from another's checkpoint) keep its held-out documents apart; else 0. Explicit values win."""
    if cfg.heldout_fraction is not None and cfg.split_seed is not None and cfg.split_block_windows is not None:
        return
    from rpt_train.rundir import read_provenance

    saved = read_provenance(cfg.model) or {}
    if cfg.heldout_fraction is None:
        cfg.heldout_fraction = float(saved.get("heldout_fraction", 0.0))
    if cfg.split_seed is None:
        cfg.split_seed = int(saved.get("split_seed", 0))
    if cfg.split_block_windows is None and saved:  # a run recorded before blocks existed split by document
        cfg.split_block_windows = int(saved.get("split_block_windows", 0))


def validate(cfg: CommonConfig) -> None:
    """Range and choice checks, each failure one sentence naming the option."""
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    need(bool(cfg.shards), "no shards given; pass --shards DIR (an `rpt-data tag` output directory)")
    need(cfg.entropy_metric in (None, "topk_entropy", "entropy"), "--entropy-metric must be topk_entropy or entropy")
    need(cfg.bucket_thresholds is None or len(cfg.bucket_thresholds) == 3, "--bucket-thresholds needs three values (easy,medium,hard), e.g. 0.5,1.0,1.5")
    need(cfg.heldout_fraction is None or 0.0 <= cfg.heldout_fraction < 1.0, "--heldout-fraction must be in [0, 1)")
    need(cfg.split_block_windows is None or cfg.split_block_windows >= 0, "--split-block-windows must be >= 0")
    need(cfg.labels_length >= 1, "--labels-length must be at least 1")
    need(cfg.max_new_tokens >= 1, "--max-new-tokens must be at least 1")
    need(cfg.temperature > 0, "--temperature must be positive (greedy decoding is not sampling)")
    need(0 < cfg.top_p <= 1, "--top-p must be in (0, 1]")
    need(cfg.chat_template in ("auto", "on", "off"), "--chat-template must be auto, on or off")
    need(cfg.answer_format in ("boxed", "answer_tag"), "--answer-format must be boxed or answer_tag")
    if isinstance(cfg, SampleConfig):
        need(cfg.bucket in BUCKETS + ("all", "selected"), "--bucket must be easy, medium, hard, all or selected")
    if isinstance(cfg, TrainConfig):
        need(cfg.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}")
        need(cfg.steps >= 1 and cfg.batch_prompts >= 1, "--steps and --batch-prompts must be at least 1")
        need(cfg.group_size >= 2, "--group-size must be at least 2 (advantages compare rollouts of one context)")
        need(cfg.lr_schedule in ("constant", "linear", "cosine"), "--lr-schedule must be constant, linear or cosine")
        need(cfg.micro_batch_size >= 1 and cfg.ppo_epochs >= 1, "--micro-batch-size and --ppo-epochs must be >= 1")
        need(cfg.max_sampling_rounds >= 1, "--max-sampling-rounds must be at least 1")
        if isinstance(cfg.rollout_gather, bool):  # recipes and runs from before auto: true / false
            cfg.rollout_gather = "on" if cfg.rollout_gather else "off"
        need(cfg.rollout_gather in ("auto", "on", "off"), "--rollout-gather must be auto, on or off")
        need(cfg.sampler in ("uniform", "learnability"), "--sampler must be uniform or learnability")
        need(cfg.sampler_pool >= 1, "--sampler-pool must be at least 1")
        need(cfg.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1")
        need(cfg.clip_low >= 0 and cfg.resolved_clip_high() >= 0, "--clip-low/--clip-high must be non-negative")
        need(cfg.beta >= 0, "--beta must be non-negative")
        need(cfg.on_bad_step in ("skip", "stop"), "--on-bad-step must be skip or stop")
        need(cfg.bad_grad_norm >= 0 and cfg.max_bad_steps >= 1, "--bad-grad-norm must be >= 0, --max-bad-steps >= 1")
        need(cfg.logprob_chunk_tokens >= 1, "--logprob-chunk-tokens must be at least 1")
        need(cfg.device_memory >= 0, "--device-memory must be non-negative (GiB; 0 = the device's own)")
        cfg.allow_changed = [n.strip().replace("-", "_") for v in cfg.allow_changed for n in v.split(",") if n.strip()]
        other = [n for n in cfg.allow_changed if n not in RESUME_CHANGEABLE]
        need(not other, f"--allow-changed takes {CHANGEABLE_FLAGS}, not {', '.join(other)}: the others "
             "change what a run computes, so a resume keeps them (start a new run in another --out from --model "
             "RUN to change them)")
        need(cfg.resume or not cfg.allow_changed, "--allow-changed applies to a --resume only")
        from rpt_train.objectives import check as check_objective

        check_objective(cfg, BUCKETS)
    if isinstance(cfg, ExportConfig):
        need(cfg.format in ("verl", "trl", "openrlhf"), "--format must be verl, trl or openrlhf")
        need(cfg.limit >= 0 and cfg.heldout_limit >= 0 and cfg.batch_rows >= 1,
             "--limit and --heldout-limit must be >= 0, --batch-rows >= 1")
    if isinstance(cfg, EvalConfig):
        need(cfg.split in ("auto", "heldout", "train", "all"), "--split must be auto, heldout, train or all")
        need(cfg.split != "heldout" or cfg.heldout_fraction > 0, "--split heldout needs --heldout-fraction > 0")
        need(cfg.limit >= 1 and cfg.samples >= 1, "--limit and --samples must be at least 1")
        need(cfg.think_overflow in ("fail", "close"), "--think-overflow must be fail or close")
        need(cfg.think_overflow != "close" or (cfg.think_budget > 0 and cfg.answer_room >= 1),
             "--think-overflow close needs --think-budget > 0 and --answer-room >= 1")
        if cfg.think_overflow == "close":
            from rpt_train.budget import check_think_close
            from rpt_train.reward import THINK_END
            from rpt_train.templates import load_template

            check_think_close(cfg)
            need(THINK_END in load_template(cfg.template), f"--think-overflow close cuts every completion without "
                 f"{THINK_END} and reads the answer from the forced text, but --template '{cfg.template}' does not "
                 f"ask for {THINK_END}; use a template that does (think, think-brief) or --think-overflow fail")


def to_dict(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
