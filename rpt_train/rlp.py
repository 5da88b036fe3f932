"""`--objective rlp`: the information-gain reward of RLP (arXiv 2510.01265). For a position t, the policy writes a
thought c after the raw context x_<t and `<think>`; the thought's reward is

    log p_policy(x_t..x_{t+k-1} | x_<t, <think> c </think>) - log p_EMA(x_t..x_{t+k-1} | x_<t)

(k = --rlp-tokens true continuation tokens, 1 by default as in the paper), in nats: how much the thought raised
the log-likelihood of what really comes next over the no-thought prediction of a slowly moving (EMA) copy of the
policy. Dense, no verifier; the update trains the thought tokens only (the completion is the thought).

Token sequences: context + continuation are encoded together (as the RPT labels are, rpt_train/samples.py), the
context being the tokens that end inside it (BOS in front if the tokenizer adds one) and the continuation the
next k tokens, so the scored tokens are the policy's own tokens of the text. A position is scored only when
those k tokens read, after the context's, as a non-empty prefix of the true continuation; else (a policy token
straddles the cut: a mid-word position of the data tokenizer; a normaliser rewrote the text) every thought of
it gets reward 0 (no signal) and it is counted in `rlp_skipped`. The condition with the thought is the one
encoding of the text `context<think>thought</think>` (the rollout prompt is that of `context<think>`), so no
tokenizer reads spaces between the pieces; the thought is its decoded text re-encoded (a sampled non-canonical
tokenization is scored as its canonical one), cut at its first `</think>`. Only the thought is trained: the
completion is masked after its first `</think>` (`thought_rows`; `</think>` itself is trained, closing the
thought is the policy's act). Generation stops a row at its first `</think>` as at EOS (the objective's
`SamplingParams.stop_text`, honoured by rollout.HFRollout), so the tokens after the close are not decoded at all;
the mask is what keeps an engine that ignores the stop correct. The EMA baseline is one forward per position
(context and true continuation), not per thought."""
from __future__ import annotations

import torch

from rpt_common.bos import bos_token_id, encode_with_bos, with_bos
from rpt_train import distributed
from rpt_train.decoding import decode_after
from rpt_train.logprobs import forward_logprobs
from rpt_train.reward import THINK_END, RewardInput

THINK_START = "<think>"


def split_ids(tokenizer, context: str, label: str, k: int) -> tuple[list[int], list[int]] | None:
    """(context ids with BOS if the tokenizer adds one, the first k policy tokens of the true continuation `label`)
    from one encoding of context + label: the context's ids are the tokens that end inside it. None when the
    position cannot be scored: the context's tokens do not cover the context or the k tokens do not read after
    them as a non-empty prefix of `label` (a token straddling the cut, a rewriting normaliser)."""
    from rpt_train.samples import _joint_tokens

    ids, rest, j0 = _joint_tokens(tokenizer, context, label)
    ctx, target = with_bos(bos_token_id(tokenizer), ids[:j0]), ids[j0:j0 + k]
    text = decode_after(tokenizer, ctx, target) if target and not rest else ""
    return (ctx, target) if text and label.startswith(text) else None


def condition_ids(tokenizer, context: str, thought: str) -> list[int]:
    """The policy's tokens of `context<think>thought</think>` (BOS in front if the tokenizer adds one)."""
    return encode_with_bos(tokenizer, [context + THINK_START + thought + THINK_END])[0]


def thought_of(completion: str) -> str:
    """The thought: the completion up to its first `</think>` (all of it when the budget cut it)."""
    return completion.split(THINK_END, 1)[0]


def thought_rows(tokenizer, rollouts):
    """`rollouts` with each completion masked after the token that completes its first `</think>` (that token
    kept): the update trains the thought, not what the policy wrote after closing it (which the reward never
    reads). Rows whose text has no `</think>` (a thought cut by the budget) stay whole."""
    import dataclasses

    from rpt_train.rollout import special_ids

    mask, drop = rollouts.completion_mask.clone(), special_ids(tokenizer)
    for r, text in enumerate(rollouts.texts):
        if THINK_END not in text:
            continue
        prompt = rollouts.prompt_ids[r][rollouts.prompt_mask[r].bool()].tolist()
        ids = rollouts.completion_ids[r, :int(mask[r].sum())].tolist()  # the mask is a prefix

        def closed(m: int) -> bool:  # the text of the first m tokens (as the rollout decodes it) closes the thought
            return THINK_END in decode_after(tokenizer, prompt, [t for t in ids[:m] if t not in drop])

        lo, hi = 1, len(ids)
        while lo < hi:  # the first m with closed(m); len(ids) when the engine's text is not this decoding
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if closed(mid) else (mid + 1, hi)
        mask[r, lo:] = 0
    keep = mask.to(rollouts.logprobs.dtype) if rollouts.logprobs is not None else None
    return dataclasses.replace(
        rollouts, completion_mask=mask, logprobs=rollouts.logprobs * keep if keep is not None else None,
        entropy=rollouts.entropy * mask.to(rollouts.entropy.dtype) if rollouts.entropy is not None else None)


PROBE_CONTEXT, PROBE_THOUGHT = "The quick brown fox", " the next word is"  # check_tokenizer's probe


def check_tokenizer(tokenizer) -> None:
    """Refuse (one sentence) a tokenizer under which the policy's own `</think>` after a thought does not read back
    as `</think>` (a WordPiece decoder writes '< / think >'): the reward would score the whole completion as the
    thought and the update would train all of it. The probe is read as rollouts are (rollout.completion_texts)."""
    from rpt_common.errors import UserError
    from rpt_train.rollout import completion_texts

    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    ids = tokenizer(PROBE_THOUGHT + THINK_END, add_special_tokens=False)["input_ids"]
    row = torch.tensor([ids], dtype=torch.long)
    text = completion_texts(tokenizer, [ThinkPrompt(tokenizer).ids(PROBE_CONTEXT)], 1, row, torch.ones_like(row))[0]
    if THINK_END not in text:
        raise UserError(f"--objective rlp: with tokenizer '{name}' a thought closed by the policy's own {THINK_END} "
                        f"({PROBE_THOUGHT + THINK_END!r}) reads back as {text!r}, so the reward would score the whole "
                        f"completion as the thought and the update would train all of it; add {THINK_END} to the "
                        "tokenizer as one token or use a tokenizer that writes text back as it is (byte-level BPE, "
                        "SentencePiece)")


class ThinkPrompt:
    """The rollout prompt of rlp: the raw context (as pre-training saw it) then `<think>`; no instruction."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def ids(self, context: str) -> list[int]:
        return encode_with_bos(self.tokenizer, [self.text(context)])[0]

    def text(self, context: str) -> str:
        return context + THINK_START

    def completion(self, generated: str) -> str:
        return generated


@torch.no_grad()
def continuation_logprob(model, conditions: list[list[int]], targets: list[list[int]], pad: int) -> torch.Tensor:
    """[n] summed log p(targets[i] | conditions[i]) under `model` (temperature 1), one batched forward."""
    device = next(model.parameters()).device
    P, C = max(map(len, conditions)), max(map(len, targets))
    prompt = torch.full((len(conditions), P), pad, dtype=torch.long)
    pmask = torch.zeros_like(prompt)
    comp = torch.full((len(targets), C), pad, dtype=torch.long)
    cmask = torch.zeros_like(comp)
    for i, (c, t) in enumerate(zip(conditions, targets)):  # prompt left-padded, continuation right-padded
        prompt[i, P - len(c):], pmask[i, P - len(c):] = torch.tensor(c), 1
        comp[i, :len(t)], cmask[i, :len(t)] = torch.tensor(t), 1
    lp, _ = forward_logprobs(model, prompt.to(device), pmask.to(device), comp.to(device), cmask.to(device), 1.0)
    return (lp.float() * cmask.to(device)).sum(1).cpu()


class InfoGainReward:
    """The rlp reward function (a RewardFn over one rank's rollouts, group-contiguous). Every rank calls it every
    round, with its own (possibly empty) rollouts: the forwards are padded so FSDP2's gathers pair up."""

    def __init__(self, policy, ema, tokenizer, *, tokens: int = 1, batch_size: int = 8):
        self.policy, self.ema, self.tokenizer, self.k, self.batch = policy, ema, tokenizer, tokens, max(1, batch_size)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.reset()

    def reset(self) -> None:
        self.tokens = self.ema_tokens = self.skipped = 0
        self.gains: list[float] = []

    def mean_gain(self) -> float | None:
        total, n = distributed.all_sum([sum(self.gains), float(len(self.gains))])
        return total / n if n else None

    def _scores(self, model, conditions, targets) -> torch.Tensor:
        out = []
        chunks = [range(i, min(i + self.batch, len(conditions))) for i in range(0, len(conditions), self.batch)]
        for rows in distributed.pad_to_max(chunks):
            if rows is None:  # another rank has more: a discarded forward keeps the gathers paired
                continuation_logprob(model, [[self.pad]], [[self.pad]], self.pad)
                continue
            out.append(continuation_logprob(model, [conditions[i] for i in rows], [targets[i] for i in rows],
                                            self.pad))
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, items: list[RewardInput]) -> list[float]:
        # Per-position data keyed by (context, true continuation): everything scored depends on exactly that pair,
        # so two groups with the same context text but different continuations are each scored against their own,
        # and two equal positions share one baseline (their scores are equal, as they should be).
        keys = [(it.context, "".join(it.label_tokens)) for it in items]
        split = {key: split_ids(self.tokenizer, key[0], key[1], self.k) for key in keys}
        self.skipped += sum(v is None for v in split.values())  # positions whose continuation cannot be scored
        positions = [key for key, v in split.items() if v is not None]  # one EMA baseline per position
        ctx_ids, labels = {key: split[key][0] for key in positions}, {key: split[key][1] for key in positions}
        scored = [(key, it) for key, it in zip(keys, items) if split[key] is not None]
        conditions = [condition_ids(self.tokenizer, it.context, thought_of(it.completion)) for _, it in scored]
        with_thought = self._scores(self.policy, conditions, [labels[key] for key, _ in scored])
        baseline = self._scores(self.ema, [ctx_ids[key] for key in positions], [labels[key] for key in positions])
        base = dict(zip(positions, baseline.tolist()))
        ema_tokens = sum(len(ctx_ids[key]) + len(labels[key]) for key in positions)
        self.ema_tokens += ema_tokens
        self.tokens += sum(len(c) + len(labels[key]) for c, (key, _) in zip(conditions, scored)) + ema_tokens
        gains = iter([float(w) - base[key] for w, (key, _) in zip(with_thought.tolist(), scored)])
        rewards = [next(gains) if split[key] is not None else 0.0 for key in keys]  # skipped: no signal
        self.gains += [r for r, key in zip(rewards, keys) if split[key] is not None]
        return rewards
