"""One step's rollouts: draw contexts, roll out G completions each, reward by prefix match, and (dynamic
sampling) keep only groups whose rewards differ, refilling from new contexts. Rank bookkeeping is apart.

Several ranks: each round every rank draws the same global contexts (the sampler state stays global) and rolls
out its stripe of whole groups (contexts rank, rank + W, ...); `_Placement` shares the keep flags so every rank
knows the global count still needed and where its kept groups sit in the batch one process would have built."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rpt_train import distributed
from rpt_train.advantages import group_std
from rpt_train.reward import RewardFn, RewardInput, extract_answer, prefix_match
from rpt_train.rollout import RolloutBatch, RolloutEngine, SamplingParams, concat_batches, empty_batch, select_rows
from rpt_train.samples import Sample, TrainSamples
from rpt_train.sampler import LearnabilityScorer, choose
from rpt_train.templates import PromptBuilder


@dataclass(kw_only=True, slots=True)
class Groups:
    """Rollouts of some contexts, G rows per context, group-contiguous."""

    samples: list[Sample]
    rollouts: RolloutBatch
    rewards: torch.Tensor  # [N]
    answers: list[str | None]
    index: list[int] | None = None  # per group: its place in the step's global batch (all ranks), None = in order


def rollout_groups(samples: list[Sample], prompts: PromptBuilder, engine: RolloutEngine, reward_fn: RewardFn,
                   params: SamplingParams, answer_format: str) -> Groups:
    """G completions per context, their extracted answers and rewards."""
    rollouts = engine.generate([prompts.ids(s.context) for s in samples], params)
    texts = [prompts.completion(t) for t in rollouts.texts]
    answers = [extract_answer(t, answer_format) for t in texts]
    per_row = [s for s in samples for _ in range(params.n)]
    items = [RewardInput(completion=t, answer=a, label_tokens=s.label_tokens, context=s.context)
             for t, a, s in zip(texts, answers, per_row)]
    # a collective reward (rlp: forwards through FSDP2) runs on every rank, even one without rollouts this round
    rewards = reward_fn(items) if items or getattr(reward_fn, "collective", False) else []
    return Groups(samples=samples, rollouts=rollouts, rewards=torch.tensor(rewards, dtype=torch.float32),
                  answers=answers)


@dataclass(slots=True)
class _Placement:
    """Where this rank's kept groups go in the global batch, over the refill rounds of one step."""

    kept_before: int = 0  # groups kept by all ranks in earlier rounds
    index: list[int] = field(default_factory=list)

    def add_round(self, keep: list[bool], drawn: int, need: int) -> tuple[list[bool], int]:
        """Record this rank's keep flags of one round, only the first `need` kept groups in draw order over all
        ranks (an oversampled refill may keep more); returns this rank's flags so trimmed and the groups kept by
        all ranks in the round."""
        rank, world = distributed.rank(), distributed.world_size()
        stripes = distributed.all_gather_objects(keep)
        flags = [bool(stripes[i % world][i // world]) for i in range(drawn)]  # every rank's keep flags, draw order
        before = np.cumsum([0] + flags)
        flags = [f and int(b) < need for f, b in zip(flags, before)]
        keep = [flags[rank + g * world] for g in range(len(keep))]
        self.index += [self.kept_before + int(before[rank + g * world]) for g, k in enumerate(keep) if k]
        self.kept_before += sum(flags)
        return keep, sum(flags)


def refill_size(need: int, kept: int, drawn: int, batch: int) -> int:
    """Contexts a dynamic-sampling refill round draws for `need` missing groups: need / (the keep rate observed so
    far this step), as DAPO oversamples, so one refill usually completes the batch instead of a lockstep decode per
    few missing groups (under FSDP a round costs every rank a full decode however few contexts it has). At most a
    first round's `batch` contexts (the rollout memory the plan counts); the surplus kept groups are dropped."""
    return min(batch, max(need, -(-need * drawn // kept) if kept else batch))


def collect(cfg, data: TrainSamples, prompts: PromptBuilder, engine: RolloutEngine, reward_fn: RewardFn,
            params: SamplingParams, scorer: LearnabilityScorer | None = None
            ) -> tuple[Groups | None, list[Groups], dict]:
    """One step's training groups. With dynamic sampling, groups whose rewards all agree (zero std, no signal)
    are dropped and new contexts drawn, at most --max-sampling-rounds rounds; stats cover every rollout made.
    With a `scorer` (--sampler learnability) each round's contexts are the most learnable of a larger pool.
    The batch is None when no rank kept a group, and empty on a rank that kept none while others did."""
    G, need, rounds, made, kept, n_drawn = cfg.group_size, cfg.batch_prompts, 0, [], [], 0
    rank, world, place = distributed.rank(), distributed.world_size(), _Placement()
    pool_p, chosen_p, rolled_out, rolled_keys, scored_tokens = [], [], [], [], 0
    t0 = time.perf_counter()
    while need > 0 and rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        rounds += 1
        want = need if rounds == 1 else refill_size(need, place.kept_before, n_drawn, cfg.batch_prompts)
        drawn = data.next_batch(want * (cfg.sampler_pool if scorer is not None else 1))
        if scorer is not None:
            pool_ids = [prompts.ids(s.context) for s in drawn]
            scored_tokens += sum(map(len, pool_ids))  # one forward over the pool's prompts (all ranks together)
            chosen, p = choose(drawn, pool_ids, scorer, want, G)
            drawn = [drawn[i] for i in chosen]
            pool_p += p.tolist()
            chosen_p += p[chosen].tolist()
        n_drawn += len(drawn)
        rolled_out += [s.index for s in drawn]
        rolled_keys += [s.key for s in drawn]
        groups = rollout_groups(drawn[rank::world], prompts, engine, reward_fn, params, cfg.answer_format)
        made.append(groups)
        keep = (group_std(groups.rewards, G) > 0).tolist() if cfg.dynamic_sampling else [True] * len(groups.samples)
        keep, got = place.add_round(keep, len(drawn), need)
        if any(keep):
            kept.append(take_groups(groups, [g for g, k in enumerate(keep) if k], G))
        need -= got
    stats = rollout_stats(made, G, distributed.all_max(time.perf_counter() - t0))
    stats |= {"sampling_rounds": rounds, "contexts_drawn": n_drawn, "groups_kept": place.kept_before,
              "samples_skipped": data.build.skipped, "contexts": rolled_out,
              "context_keys": rolled_keys}
    if scorer is not None:  # the policy's P(correct first answer token): the pool scored, the contexts rolled out
        stats |= {"sampler_p_pool": float(np.mean(pool_p)), "sampler_p_chosen": float(np.mean(chosen_p)),
                  "contexts_scored": len(pool_p), "scored_tokens": scored_tokens}
    batch = None
    if kept:
        batch = Groups(samples=[s for g in kept for s in g.samples], answers=[a for g in kept for a in g.answers],
                       rollouts=concat_batches([g.rollouts for g in kept], pad=engine_pad(engine)),
                       rewards=torch.cat([g.rewards for g in kept]), index=place.index)
    elif place.kept_before:
        batch = Groups(samples=[], answers=[], rollouts=empty_batch(), rewards=torch.zeros(0), index=[])
    return batch, made, stats


def rollout_stats(made: list[Groups], G: int, rollout_seconds: float) -> dict:
    """Reward, accuracy, answer rate, length and policy entropy over every rollout of the step (all ranks); entropy
    None when the engine gives none (the update then measures it on the rows it trains)."""
    rewards = distributed.cat_from_ranks(torch.cat([g.rewards for g in made]))  # whole groups: still contiguous
    answers = [a for g in made for a in g.answers]
    labels = [s.label_tokens for g in made for s in g.samples for _ in range(G)]
    correct = distributed.cat_from_ranks(torch.tensor([prefix_match(a, lab) for a, lab in zip(answers, labels)],
                                                      dtype=torch.bool))
    answered = distributed.cat_from_ranks(torch.tensor([a is not None for a in answers], dtype=torch.bool))
    lengths = distributed.cat_from_ranks(torch.cat([g.rollouts.lengths for g in made]).float())
    tokens = float(lengths.sum())
    entropy = None  # the policy entropy (nats per token) from the sampler's own distributions: no forward to log it
    if all(g.rollouts.entropy is not None for g in made):
        total, count = distributed.all_sum([sum(float(g.rollouts.entropy.sum()) for g in made),
                                            sum(float(g.rollouts.trained_mask.sum()) for g in made)])
        entropy = total / count if count else None
    return {
        "entropy": entropy,
        "reward": float(rewards.mean()),
        "reward_std": float(group_std(rewards, G).mean()),
        "frac_reward_zero_std": float((group_std(rewards, G) == 0).float().mean()),
        "ntr_accuracy": float(np.mean(correct.numpy())),
        "answer_rate": float(np.mean(answered.numpy())),
        "completion_length": float(lengths.mean()),
        "rollout_tokens": int(tokens),
        # prefill: HFRollout runs each distinct prompt once and repeats its cache for the G completions
        "prompt_tokens": int(distributed.all_sum([sum(float(g.rollouts.prompt_mask.sum()) / G for g in made)])[0]),
        "rollout_seconds": rollout_seconds,
        "rollout_tokens_per_s": tokens / max(rollout_seconds, 1e-9),
    }


def engine_pad(engine) -> int:
    tok = getattr(engine, "tokenizer", None)
    return tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0


def take_groups(groups: Groups, keep: list[int], G: int) -> Groups:
    rows = [g * G + j for g in keep for j in range(G)]
    return Groups(samples=[groups.samples[g] for g in keep], rollouts=select_rows(groups.rollouts, rows),
                  rewards=groups.rewards[rows], answers=[groups.answers[r] for r in rows])


def sample_records(step: int, made: list[Groups], prompts: PromptBuilder, limit: int) -> list[dict]:
    """The first rollouts of the step for samples.jsonl: prompt tail, completion, answer, label, reward (under
    torchrun: those of rank 0)."""
    records = []
    for groups in (g for g in made if g.samples):  # a rank's share of a refill round may be empty
        G = len(groups.answers) // len(groups.samples)
        for r, (text, answer) in enumerate(zip(groups.rollouts.texts, groups.answers)):
            s = groups.samples[r // G]
            records.append({"step": step, "key": s.key, "bucket": s.bucket, "entropy": s.entropy,
                            "prompt_tail": prompts.text(s.context)[-300:], "answer": answer,
                            "completion": prompts.completion(text),
                            "label": "".join(s.label_tokens), "label_tokens": s.label_tokens,
                            "correct": prefix_match(answer, s.label_tokens), "reward": float(groups.rewards[r])})
            if len(records) == limit:
                return records
    return records
