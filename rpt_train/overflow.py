"""--think-overflow close: budget forcing (s1, arXiv 2501.19393) for the thinking template of issue 34.

A rollout that has not written `</think>` within its first `budget` tokens (its thought ran over the budget, or it
stopped before it without closing) is cut there (a final EOS dropped), the forced text --think-close (default
"</think>\\n\\boxed{": the close tag, then the answer opening that the answer-only template's response prefix
writes) is appended as token ids, and the policy writes up to --answer-room more tokens from there: a second
generate call of the wrapped engine on just those rows, each prompt = its prompt + thought + forced ids. Rows
that closed `</think>` themselves are left as generated (budget + answer room tokens at most).

The forced tokens are not the policy's samples: `RolloutBatch.forced` marks them (1), and the update leaves them
out of its loss, normaliser, clip/KL/entropy sums (`RolloutBatch.trained_mask`); they stay in the sequence every
forward reads (attention, packing), and the reward reads the answer after `</think>` as usual."""
from __future__ import annotations

import dataclasses

import torch

from rpt_train.budget import forced_bound  # noqa: F401 (part of this API)
from rpt_train.reward import THINK_END
from rpt_train.rollout import RolloutBatch, SamplingParams, completion_texts, special_ids

OVERFLOWS = ("fail", "close")
THINK_CLOSE = "</think>\n\\boxed{"  # </think>, then the answer opening ('\boxed{', the answer-only response prefix)


def forced_ids(tokenizer, text: str) -> list[int]:
    """The token ids of the forced text (its own encoding, no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ForcedClose:
    """A RolloutEngine that applies --think-overflow close to `engine` (see the module doc). `budget` is the
    step's thinking budget (the trainer moves it every step); `generate` asks the inner engine for budget +
    `answer_room` tokens, then for `answer_room` more on the forced rows. Every call makes the second call, with
    no prompt where no row is forced, so collective engines (FSDP lockstep) stay paired. Counters since `pop_stats`:
    rows, forced rows, forced tokens and the extra forward tokens (a forced row's second prefill over its prompt
    and thought, and the first call's tokens after the cut, which the completion no longer holds)."""

    def __init__(self, engine, tokenizer, close_text: str, budget: int, answer_room: int):
        self.engine, self.tokenizer = engine, tokenizer
        self.budget, self.answer_room = budget, answer_room
        self.ids = forced_ids(tokenizer, close_text)
        self.drop = special_ids(tokenizer)  # a final EOS (or other special token) before the budget is dropped
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.counts = dict.fromkeys(("rows", "forced_rows", "forced_tokens", "extra_forward_tokens"), 0)

    def sync(self, model) -> None:
        self.engine.sync(model)

    def pop_stats(self) -> dict:
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        first = self.engine.generate(prompts, dataclasses.replace(params,
                                                                  max_new_tokens=self.budget + self.answer_room))
        n = params.n
        rows = len(first.texts)
        ids, mask = first.completion_ids[:, :self.budget], first.completion_mask[:, :self.budget]
        heads = completion_texts(self.tokenizer, prompts, n, ids, mask) if rows else []
        forced = [r for r in range(rows) if THINK_END not in heads[r]]
        thoughts = {}
        for r in forced:
            t = ids[r][mask[r].bool()].tolist()
            ended = int(first.completion_mask[r].sum()) <= self.budget  # stopped within the budget (EOS)
            thoughts[r] = t[:-1] if ended and t and t[-1] in self.drop else t  # the EOS goes
        second = self.engine.generate([prompts[r // n] + thoughts[r] + self.ids for r in forced],
                                      dataclasses.replace(params, n=1, max_new_tokens=self.answer_room))
        self.counts["rows"] += rows
        self.counts["forced_rows"] += len(forced)
        self.counts["forced_tokens"] += len(forced) * len(self.ids)
        # the second prefill (prompt + thought; the forced ids count as completion tokens) and the first call's
        # tokens after the cut: prompt + the first call's whole length
        self.counts["extra_forward_tokens"] += sum(len(prompts[r // n]) + int(first.completion_mask[r].sum())
                                                   for r in forced)
        if not forced:
            return first
        return self._assemble(first, second, forced, thoughts, prompts, n)

    def _assemble(self, first: RolloutBatch, second: RolloutBatch, forced: list[int], thoughts: dict,
                  prompts: list[list[int]], n: int) -> RolloutBatch:
        """The first call's rows, the forced ones replaced by thought + forced ids + second-call answer."""
        rows = len(first.texts)
        where = {r: j for j, r in enumerate(forced)}
        parts = []  # per row: (token ids, sampler log-probs, entropies, forced flags)
        for r in range(rows):
            if r not in where:
                m = first.completion_mask[r].bool()
                parts.append((first.completion_ids[r][m].tolist(),
                              first.logprobs[r][m].tolist() if first.logprobs is not None else None,
                              first.entropy[r][m].tolist() if first.entropy is not None else None,
                              [0] * int(m.sum())))
                continue
            j, t = where[r], len(thoughts[r])
            m2 = second.completion_mask[j].bool()
            answer = second.completion_ids[j][m2].tolist()
            k = len(self.ids)

            def join(a, b):
                return None if a is None or b is None else a[r][:t].tolist() + [0.0] * k + b[j][m2].tolist()

            parts.append((thoughts[r] + self.ids + answer, join(first.logprobs, second.logprobs),
                          join(first.entropy, second.entropy), [0] * t + [1] * k + [0] * len(answer)))
        C = max([len(p[0]) for p in parts] + [1])
        comp = torch.full((rows, C), self.pad, dtype=torch.long)
        cmask, fmask = torch.zeros(rows, C, dtype=torch.long), torch.zeros(rows, C, dtype=torch.long)
        lp = torch.zeros(rows, C) if all(p[1] is not None for p in parts) else None
        ent = torch.zeros(rows, C) if all(p[2] is not None for p in parts) else None
        for r, (t, logp, e, f) in enumerate(parts):
            comp[r, :len(t)] = torch.tensor(t, dtype=torch.long)
            cmask[r, :len(t)] = 1
            fmask[r, :len(t)] = torch.tensor(f, dtype=torch.long)
            if lp is not None:
                lp[r, :len(t)] = torch.tensor(logp)
            if ent is not None:
                ent[r, :len(t)] = torch.tensor(e)
        texts = list(first.texts)
        redone = completion_texts(self.tokenizer, [prompts[r // n] for r in forced], 1, comp[forced], cmask[forced])
        for r, text in zip(forced, redone):
            texts[r] = text
        device = first.completion_ids.device
        return RolloutBatch(prompt_ids=first.prompt_ids, prompt_mask=first.prompt_mask, completion_ids=comp.to(device),
                            completion_mask=cmask.to(device), logprobs=lp.to(device) if lp is not None else None,
                            texts=texts, entropy=ent.to(device) if ent is not None else None, forced=fmask.to(device))
