"""Objectives beyond answer-only RPT (issue 34), as options of `rpt-train run`:

- thinking with a token budget (`--think-budget`, optionally decaying to `--think-budget-final` over
  `--think-decay-steps`): each rollout may write budget + `--answer-room` tokens; a completion without `</think>`
  (a thought cut by the budget) gets the no-answer reward, or with `--think-overflow close` is cut at the budget
  and closed by force, then answered (budget forcing: rpt_train/overflow.py);
- `--ntp-weight`: next-token cross-entropy on each trained context (its tokens up to and including the true next
  token) added to the RL loss of every optimizer update;
- `--curriculum easy,medium,hard` with `--curriculum-steps`: the bucket drawn from changes at those steps;
- `--objective rlp`: the information-gain reward of rpt_train/rlp.py, with an EMA copy of the policy (`Ema`).

`Objective` is what the trainer holds: it swaps the prompt builder and reward, draws samples by curriculum, sizes
each step's generation, adds the NTP term to updates, and keeps the EMA copy in checkpoints."""
from __future__ import annotations

import dataclasses
import sys

import torch

from rpt_common.errors import UserError
from rpt_train import distributed
from rpt_train.budget import (check_think_close, new_tokens, planned_new_tokens, think_budget,  # noqa: F401 (API)
                              think_close)
from rpt_train.reward import THINK_END, RewardFn, RewardInput

OBJECTIVES = ("rpt", "rlp")
# options added by issue 34, with the values a run saved before them computed with (a resume of such a run is not
# a change of options)
DEFAULTS = {"objective": "rpt", "think_budget": 0, "think_budget_final": None, "think_decay_steps": 0,
            "answer_room": 16, "ntp_weight": 0.0, "ema_rate": 0.999, "rlp_tokens": 1, "curriculum": [],
            "curriculum_steps": [], "think_overflow": "fail", "think_close": "auto"}


# ---- thinking budget: rpt_train.budget (think_budget, new_tokens, planned_new_tokens) ------------------------


def think_gate(reward_fn: RewardFn, no_answer: float) -> RewardFn:
    """`reward_fn`, except that a completion that never closes its thought (`</think>` missing: cut by the budget)
    gets `no_answer`, whatever it wrote in the thought."""

    def reward(items: list[RewardInput]) -> list[float]:
        values = reward_fn(items)
        return [v if THINK_END in it.completion else no_answer for v, it in zip(values, items)]

    return reward


# ---- entropy curriculum -----------------------------------------------------------------------------------------
def curriculum_bucket(cfg, step: int) -> str:
    """The bucket drawn from at training step `step` (1-based): --curriculum[i] for steps after
    --curriculum-steps[i - 1] up to --curriculum-steps[i]; the last bucket to the end."""
    if not cfg.curriculum:
        return cfg.bucket
    stage = sum(1 for b in cfg.curriculum_steps if step > b)
    return cfg.curriculum[stage]


class CurriculumSamples:
    """One TrainSamples per bucket of --curriculum (each with its own seeded, resumable order); `set_step` picks
    the one the step draws from. Otherwise it reads like the TrainSamples of the first stage. A drawn Sample's
    `index` is into its stage's own table (contexts.jsonl logs it so): rebuilding a step's samples needs the stage
    of that step (`set_step`, as the sft arm's `same_contexts` does), never another table. `answers`: as
    TrainSamples's."""

    def __init__(self, cfg, tokenizer, shards, answers: bool | None = None):
        from rpt_train.samples import TrainSamples

        self.cfg = cfg
        self.stages = {b: TrainSamples(dataclasses.replace(cfg, bucket=b, min_entropy=None), tokenizer, shards=shards,
                                       answers=answers)
                       for b in dict.fromkeys(cfg.curriculum)}
        self.current = self.stages[cfg.curriculum[0]]

    def set_step(self, step: int) -> None:
        self.current = self.stages[curriculum_bucket(self.cfg, step)]

    def __len__(self) -> int:
        return len(self.current)

    def __getattr__(self, name):  # shards, split, build, next_batch, ...: the current stage's
        return getattr(self.current, name)

    def state_dict(self) -> dict:
        return {"curriculum": {b: s.state_dict() for b, s in self.stages.items()}}

    def load_state_dict(self, state: dict) -> None:
        for b, s in self.stages.items():
            s.load_state_dict(state["curriculum"][b])


def train_samples(cfg, tokenizer, shards, answers: bool | None = None):
    """The training stream of `cfg`: by --curriculum stage (CurriculumSamples), else one TrainSamples."""
    from rpt_train.samples import TrainSamples

    return (CurriculumSamples(cfg, tokenizer, shards, answers) if cfg.curriculum
            else TrainSamples(cfg, tokenizer, shards=shards, answers=answers))


# ---- next-token loss --------------------------------------------------------------------------------------------
def ntp_ids(tokenizer, sample) -> list[int]:
    """The tokens the NTP term trains on: the context and its true next token, as the policy tokenizes the raw text
    (its BOS in front when it adds one), i.e. the prefix x_<=t of the window; never the text after the position."""
    from rpt_common.bos import encode_with_bos

    return encode_with_bos(tokenizer, [sample.context + sample.label_tokens[0]])[0]


def ntp_forward(model, rows: list[list[int]], pad: int):
    """Summed log p(x_i | x_<i) over i >= 1 of each row (with autograd) and the count of predicted tokens."""
    from rpt_train.logprobs import forward_logprobs

    device = next(model.parameters()).device
    width = max(len(r) for r in rows) - 1
    first = torch.tensor([[r[0]] for r in rows], device=device)
    rest = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(rest)
    for i, r in enumerate(rows):
        rest[i, :len(r) - 1] = torch.tensor(r[1:])
        mask[i, :len(r) - 1] = 1
    lp, _ = forward_logprobs(model, first, torch.ones_like(first), rest, mask, 1.0)
    return (lp * mask).sum(), int(mask.sum())


class NtpTerm:
    """--ntp-weight w: adds w x (mean next-token cross-entropy over the tokens of the mini-batch's contexts, all
    ranks) to the RL loss; backward runs here, before the update's gradient clipping. Called by update_policy with
    the mini-batch's rows; returns the term's value."""

    def __init__(self, cfg, tokenizer):
        self.weight, self.G, self.micro = cfg.ntp_weight, cfg.group_size, cfg.micro_batch_size
        self.tokenizer = tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.tokens = 0  # forward (and backward) tokens, for the compute accounting

    def __call__(self, model, batch, rows: list[int]) -> float:
        groups = sorted({r // self.G for r in rows})
        seqs = [ntp_ids(self.tokenizer, batch.samples[g]) for g in groups]
        seqs = [s for s in seqs if len(s) >= 2]
        total = distributed.all_sum([float(sum(len(s) - 1 for s in seqs))])[0]
        value = 0.0
        chunks = [seqs[i:i + self.micro] for i in range(0, len(seqs), self.micro)]
        for chunk in distributed.pad_to_max(chunks):
            if chunk is None or total == 0:  # another rank has more: a zero-weight pass keeps FSDP in lockstep
                lp, _ = ntp_forward(model, [[self.pad, self.pad]], self.pad)
                (lp * 0.0).backward()
                continue
            lp, n = ntp_forward(model, chunk, self.pad)
            loss = -self.weight * lp / total
            loss.backward()
            value += float(loss.detach())
            self.tokens += sum(map(len, chunk))
        return value


# ---- EMA copy of the policy -------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Ema:
    """An exponential moving average of the policy's float32 weights, a model of the policy's shape (sharded like
    it under FSDP2): after every optimizer step ema <- rate * ema + (1 - rate) * policy, parameter by parameter
    (each rank its own shards). Saved in every checkpoint and restored on --resume."""

    def __init__(self, model: torch.nn.Module, rate: float):
        self.model, self.rate = model, rate
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), policy.parameters(), strict=True):
            _local(e).mul_(self.rate).add_(_local(p.detach()), alpha=1.0 - self.rate)

    def state_dict(self) -> dict:
        """The full weights on CPU (on rank 0 under FSDP2, {} elsewhere; a collective)."""
        if not distributed.is_sharded(self.model):
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict) -> None:
        """From `state_dict()` of any number of ranks (under FSDP2 read on rank 0 and broadcast; a collective)."""
        if not distributed.is_sharded(self.model):
            self.model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state if distributed.is_main() else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# ---- what the trainer holds -------------------------------------------------------------------------------------
class Objective:
    """The options of this module for one run; the trainer calls its hooks (each a no-op for plain RPT)."""

    def __init__(self, cfg, tokenizer, ema: Ema | None = None):
        self.cfg, self.tokenizer, self.ema = cfg, tokenizer, ema
        self.ntp = NtpTerm(cfg, tokenizer) if cfg.ntp_weight > 0 else None
        self.reward_fn = None
        self.overflow = None  # --think-overflow close: the ForcedClose engine of `engine`
        self._warned_empty = False  # the empty-thought warning is said once a run
        self.step = None  # the step begin_step was last called for (step_stats logs its bucket and budget)

    @classmethod
    def build(cls, cfg, model, tokenizer, device: str, ckpt, compute_dtype, prepare=None):
        """For --objective rlp the EMA copy is loaded like the policy (from the checkpoint when resuming, its EMA
        weights restored later by `load`), after refusing a tokenizer that does not read `</think>` back."""
        ema = None
        if cfg.objective == "rlp":
            from rpt_train.rlp import check_tokenizer

            check_tokenizer(tokenizer)  # before loading the EMA copy: a tokenizer that cannot close a thought
            loaded = distributed.load_sharded_policy(str(ckpt) if ckpt else cfg.model, device, compute_dtype,
                                                     prepare=prepare)
            ema = Ema(loaded.model, cfg.ema_rate)
        return cls(cfg, tokenizer, ema)

    def prompts(self, default):
        """The prompt builder: rlp's raw context + `<think>`, else the run's template."""
        if self.cfg.objective == "rlp":
            from rpt_train.rlp import ThinkPrompt

            return ThinkPrompt(self.tokenizer)
        return default

    def reward(self, default: RewardFn, model, extra: RewardFn | None = None) -> RewardFn:
        """rlp: the information gain (plus `extra` shaping rewards); rpt with a budget: `default` gated on `</think>`."""
        from rpt_train.reward import combine

        if self.cfg.objective == "rlp":
            from rpt_train.rlp import InfoGainReward

            self.reward_fn = InfoGainReward(model, self.ema.model, self.tokenizer, tokens=self.cfg.rlp_tokens,
                                            batch_size=self.cfg.micro_batch_size)
            fn = combine([self.reward_fn, extra]) if extra is not None else self.reward_fn
            fn.collective = True  # every rank calls it every round (its forwards run through FSDP in lockstep)
            return fn
        if self.cfg.think_budget > 0:
            default = think_gate(default, self.cfg.reward_no_answer)
        return combine([default, extra]) if extra is not None else default

    def engine(self, engine):
        """The rollout engine of the run: `engine`, wrapped in budget forcing (rpt_train/overflow.py) under
        --think-overflow close."""
        if getattr(self.cfg, "think_overflow", "fail") != "close":
            return engine
        from rpt_train.overflow import ForcedClose

        self.overflow = ForcedClose(engine, self.tokenizer, think_close(self.cfg), think_budget(self.cfg, 1),
                                    self.cfg.answer_room, self.cfg.answer_format)
        return self.overflow

    def trained(self, batch):
        """The rows the update trains: for rlp each completion up to its first `</think>` (the thought)."""
        if self.cfg.objective != "rlp" or batch is None or not batch.samples:
            return batch
        from rpt_train.rlp import thought_rows

        return dataclasses.replace(batch, rollouts=thought_rows(self.tokenizer, batch.rollouts))

    def attach(self, model, optimizer) -> None:
        """The EMA follows every optimizer step (a step skipped as bad moves neither)."""
        if self.ema is not None:
            optimizer.register_step_post_hook(lambda *_: self.ema.update(model))

    def begin_step(self, step: int, data, params):
        """The step's sampling parameters (budget) after moving the curriculum to `step`; rlp rollouts stop at
        `</think>` (the completion is the thought: nothing after it is scored or trained)."""
        self.step = step
        if self.cfg.curriculum:
            data.set_step(step)
        if self.overflow is not None:  # thoughts are cut (and the answer forced) at this step's budget
            self.overflow.budget = think_budget(self.cfg, step)
        return dataclasses.replace(params, max_new_tokens=new_tokens(self.cfg, step),
                                   stop_text=THINK_END if self.cfg.objective == "rlp" else None)

    def step_stats(self) -> dict:
        """Tokens through a forward outside rollouts and the RL update (the reward's policy and EMA passes, the NTP
        term, which also runs a backward), since the last call; the step's bucket and budget. --think-overflow
        close: `forced_share`, the share of the step's rollouts whose thought was cut and closed by force,
        `forced_tokens`, and `overflow_forward_tokens` (their second prefill and the first generation's tokens
        after the cut)."""
        fwd = bwd = ema = skipped = 0
        stats = {}
        if self.step is not None and self.cfg.curriculum:
            stats["bucket"] = curriculum_bucket(self.cfg, self.step)
        if self.step is not None and getattr(self.cfg, "think_budget", 0) > 0:
            stats["think_budget"] = think_budget(self.cfg, self.step)
        if self.overflow is not None:
            c = self.overflow.pop_stats()
            rows, forced, ftok, extra, ended, thought = (int(x) for x in distributed.all_sum(
                [c["rows"], c["forced_rows"], c["forced_tokens"], c["extra_forward_tokens"], c["ended_rows"],
                 c["thought_tokens"]]))
            stats |= {"forced_share": forced / rows if rows else None, "forced_tokens": ftok,
                      "overflow_forward_tokens": extra,
                      "forced_ended_share": ended / forced if forced else None,
                      "forced_thought_tokens": thought / forced if forced else None}
            self._warn_empty_thoughts(rows, forced, thought)
        if self.reward_fn is not None:
            fwd, ema, skipped = self.reward_fn.tokens, self.reward_fn.ema_tokens, self.reward_fn.skipped
            stats["info_gain"] = self.reward_fn.mean_gain()
            self.reward_fn.reset()
        if self.ntp is not None:
            fwd, bwd = fwd + self.ntp.tokens, self.ntp.tokens
            self.ntp.tokens = 0
        fwd, bwd, ema, skipped = (int(x) for x in distributed.all_sum([fwd, bwd, ema, skipped]))  # every rank's
        stats |= {"objective_forward_tokens": fwd, "objective_backward_tokens": bwd}
        if self.reward_fn is not None:  # rlp_skipped: contexts whose continuation the policy's tokens cannot score
            stats |= {"rlp_ema_forward_tokens": ema, "rlp_skipped": skipped}
        return stats

    def _warn_empty_thoughts(self, rows: int, forced: int, thought: int) -> None:
        """Once a run (rank 0): a step whose rollouts were nearly all forced after thoughts of under one token on
        average trains answers after a forced close, not thinking; said, not refused (a run may start so)."""
        if self._warned_empty or not rows or forced < 0.9 * rows or thought >= forced:
            return
        self._warned_empty = True
        if distributed.is_main():
            print(f"warning: --think-overflow close: {forced} of {rows} rollouts this step were closed by force after "
                  f"thoughts of {thought / forced:.2f} tokens on average: the policy ends its thought (end of text) "
                  "before writing one, so the forced close follows an empty thought and the run trains answers, not "
                  "thinking (metrics.jsonl: forced_thought_tokens, forced_ended_share); a warm start in the think "
                  "format, or --think-overflow fail, makes thoughts count", file=sys.stderr)

    def state(self) -> dict:
        """What a checkpoint keeps (a collective under FSDP2)."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load(self, state: dict, ckpt) -> None:
        if self.ema is None:
            return
        has = distributed.broadcast_from_main(lambda: "ema" in state)
        if not has:
            raise UserError(f"checkpoint '{ckpt}' holds no EMA copy of the policy, which --objective rlp needs to "
                            "resume; start a new run in another --out")
        self.ema.load_state_dict(state.get("ema", {}))


def check(cfg, buckets: tuple[str, ...]) -> None:
    """Option checks of this module, each one sentence naming the option."""
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    cfg.curriculum = [b.strip() for v in cfg.curriculum for b in v.split(",") if b.strip()]  # repeated or a,b,c
    need(cfg.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}")
    need(cfg.think_budget >= 0 and cfg.think_decay_steps >= 0 and cfg.answer_room >= 1,
         "--think-budget and --think-decay-steps must be >= 0, --answer-room >= 1")
    need(cfg.think_budget_final is None or (cfg.think_budget > 0 and cfg.think_budget_final >= 1),
         "--think-budget-final needs --think-budget > 0 and must be at least 1")
    if cfg.objective == "rpt" and cfg.think_budget > 0:  # else every rollout would get the no-answer reward
        from rpt_train.templates import load_template

        need(THINK_END in load_template(cfg.template), f"--think-budget gives a rollout that never writes {THINK_END} "
             f"the no-answer reward, but --template '{cfg.template}' does not ask for {THINK_END}; use --template "
             "think (or think-brief, or a template file that asks for it)")
    need(cfg.think_overflow in ("fail", "close"), "--think-overflow must be fail or close")
    if cfg.think_overflow == "close":  # budget forcing cuts a thought at the budget and forces the answer opening
        need(cfg.think_budget > 0, "--think-overflow close needs --think-budget > 0 (the thought is cut there)")
        need(cfg.objective == "rpt", "--think-overflow close needs --objective rpt (an rlp completion is the thought "
             "itself: there is no answer to force)")
        check_think_close(cfg)
    need(cfg.ntp_weight >= 0, "--ntp-weight must be non-negative")
    need(0.0 <= cfg.ema_rate < 1.0, "--ema-rate must be in [0, 1)")
    need(1 <= cfg.rlp_tokens <= cfg.labels_length, "--rlp-tokens must be in [1, --labels-length]")
    need(all(b in tuple(buckets) + ("all", "selected") for b in cfg.curriculum),
         "--curriculum takes buckets easy, medium, hard, all or selected, e.g. easy,medium,hard")
    need(not cfg.curriculum or len(cfg.curriculum_steps) == len(cfg.curriculum) - 1,
         "--curriculum-steps needs one step per boundary (one fewer than the --curriculum buckets), e.g. 30,60")
    need(list(cfg.curriculum_steps) == sorted(set(cfg.curriculum_steps)) and all(s >= 1 for s in cfg.curriculum_steps),
         "--curriculum-steps must be increasing steps >= 1")
    need(not cfg.curriculum or cfg.min_entropy is None, "--curriculum chooses buckets; drop --min-entropy")
    need(cfg.objective != "rlp" or cfg.sampler == "uniform", "--objective rlp draws contexts with --sampler uniform "
         "(the learnability score reads a boxed answer, which an rlp thought never writes)")
