"""--think-overflow close: budget forcing (s1, arXiv 2501.19393) for the thinking template of issue 34.

A rollout that has not written `</think>` within its first `budget` tokens (its thought ran over the budget, or it
stopped before it without closing) is cut there (a final EOS dropped), the forced text --think-close (default
"</think>\\n\\boxed{": the close tag, then the answer opening that the answer-only template's response prefix
writes) is appended as token ids, and the policy writes up to --answer-room more tokens from there: a second
generate call of the wrapped engine on just those rows, each prompt = its prompt + thought + forced ids. Rows
that closed `</think>` themselves are left as generated (budget + answer room tokens at most); closed is read from
the decoded text (`closed`: a `</think>` the budget cut is the policy's own). Built only where the forced text reads
back (`check_forced_text`), under the tokenizer, as the reward reads completions.

The forced tokens are not the policy's samples: `RolloutBatch.forced` marks them (1), and the update leaves them
out of its loss, normaliser, clip/KL/entropy sums (`RolloutBatch.trained_mask`); they stay in the sequence every
forward reads (attention, packing), and the reward reads the answer after `</think>` as usual."""
from __future__ import annotations

import dataclasses

import torch

from rpt_common.errors import UserError
from rpt_train import distributed
from rpt_train.budget import forced_bound  # noqa: F401 (part of this API)
from rpt_train.reward import ANSWER_CLOSINGS, ANSWER_OPENINGS, THINK_END, extract_answer
from rpt_train.rollout import RolloutBatch, SamplingParams, completion_texts, concat_batches, special_ids

OVERFLOWS = ("fail", "close")
THINK_CLOSE = "</think>\n\\boxed{"  # </think>, then the answer opening ('\boxed{', the answer-only response prefix)
# the probe of `check_forced_text`: a prompt ending as the think template's does, and a thought in plain words
PROBE_PROMPT, PROBE_THOUGHT = "Continue the text.\n<think>\n", " the next word is"


def forced_ids(tokenizer, text: str) -> list[int]:
    """The token ids of the forced text (its own encoding, no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _read(tokenizer, prompt: list[int], ids: list[int]) -> str:
    """`ids` as the reward reads a completion after `prompt` (rollout.completion_texts)."""
    row = torch.tensor([ids], dtype=torch.long)
    return completion_texts(tokenizer, [prompt], 1, row, torch.ones_like(row))[0]


def check_forced_text(tokenizer, close_text: str, ids: list[int], answer_format: str = "boxed") -> None:
    """Refuse (one sentence) a tokenizer under which budget forcing could never be rewarded: a thought + the forced
    ids + an answer 'x' written after them must read back, as the reward decodes completions, with the answer 'x'
    (a WordPiece decoder writes '</think>\\n\\boxed{' as '< / think > boxed', and no forced row would ever have
    an answer); and the policy's own `</think>` after a thought must read back as `</think>` (else no rollout could
    close its thought and every one would be forced)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    prompt, thought = forced_ids(tokenizer, PROBE_PROMPT), forced_ids(tokenizer, PROBE_THOUGHT)
    opening = ANSWER_OPENINGS[answer_format]
    probe = ("" if close_text.endswith(opening) else opening) + "x" + ANSWER_CLOSINGS[answer_format]
    whole = forced_ids(tokenizer, close_text + probe)  # the answer as written right after the forced text
    answer = whole[len(ids):] if whole[:len(ids)] == ids else forced_ids(tokenizer, probe)
    text = _read(tokenizer, prompt, thought + ids + answer)
    if THINK_END not in text or extract_answer(text, answer_format) != "x":
        raise UserError(f"--think-overflow close: with tokenizer '{name}' a thought, the forced text {close_text!r} "
                        f"and the answer {probe!r} read back as {text!r}, in which the reward finds no "
                        f"{THINK_END} and answer 'x' ({answer_format}); use a tokenizer that writes the forced text "
                        "back as it is (byte-level BPE, SentencePiece) or --think-overflow fail")
    own = _read(tokenizer, prompt, forced_ids(tokenizer, PROBE_THOUGHT + THINK_END))
    if THINK_END not in own:
        raise UserError(f"--think-overflow close: with tokenizer '{name}' a thought closed by the policy's own "
                        f"{THINK_END} reads back as {own!r}, so no rollout could close its thought and every one "
                        f"would be forced; add {THINK_END} to the tokenizer as one token or use --think-overflow fail")


def closed(head: str, full: str) -> bool:
    """Whether a completion wrote `</think>` within its budget: `head` (the text of its first budget tokens) holds
    it, or ends in a proper prefix of it that `full` (the whole first-call text) completes (' dog</t' cut from
    ' dog</think>' when `</think>` is several tokens)."""
    if THINK_END in head:
        return True
    return any(head.endswith(THINK_END[:k]) and full.startswith(head[:len(head) - k] + THINK_END)
               for k in range(1, len(THINK_END)))


class ForcedClose:
    """A RolloutEngine that applies --think-overflow close to `engine` (see the module doc). `budget` is the
    step's thinking budget (the trainer moves it every step); `generate` asks the inner engine for budget +
    `answer_room` tokens, then for `answer_room` more on the forced rows (`_second`). When any rank forced a row
    every rank makes the second call (with no prompt where it forced none), so collective engines (FSDP lockstep)
    stay paired; when none did, none makes it. Counters since `pop_stats`:
    rows, forced rows, forced tokens and the extra forward tokens (a forced row's second prefill over its prompt
    and thought, and the first call's tokens after the cut, which the completion no longer holds); of the forced
    rows, those whose thought ended (EOS) before the budget rather than being cut at it, and their thought tokens
    (the policy's own, kept before the forced ids). A policy that ends its thought at once gets the forced close
    after an empty thought and is rewarded on the answer: budget forcing then trains no thinking, and these two
    counters are how a run shows it (issue 34's rpt-think arm: every thought empty from about step 37)."""

    def __init__(self, engine, tokenizer, close_text: str, budget: int, answer_room: int,
                 answer_format: str = "boxed"):
        self.engine, self.tokenizer = engine, tokenizer
        self.budget, self.answer_room = budget, answer_room
        self.ids = forced_ids(tokenizer, close_text)
        check_forced_text(tokenizer, close_text, self.ids, answer_format)
        self.drop = special_ids(tokenizer)  # a final EOS (or other special token) before the budget is dropped
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.counts = dict.fromkeys(("rows", "forced_rows", "forced_tokens", "extra_forward_tokens", "ended_rows",
                                     "thought_tokens"), 0)

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
        forced = [r for r in range(rows) if not closed(heads[r], first.texts[r])]
        thoughts = {}
        for r in forced:
            t = ids[r][mask[r].bool()].tolist()
            ended = int(first.completion_mask[r].sum()) <= self.budget  # stopped within the budget (EOS)
            thoughts[r] = t[:-1] if ended and t and t[-1] in self.drop else t  # the EOS goes
            self.counts["ended_rows"] += ended
            self.counts["thought_tokens"] += len(thoughts[r])
        self.counts["rows"] += rows
        self.counts["forced_rows"] += len(forced)
        self.counts["forced_tokens"] += len(forced) * len(self.ids)
        # the second prefill (prompt + thought; the forced ids count as completion tokens) and the first call's
        # tokens after the cut: prompt + the first call's whole length
        self.counts["extra_forward_tokens"] += sum(len(prompts[r // n]) + int(first.completion_mask[r].sum())
                                                   for r in forced)
        # every rank takes the same branch (one all-reduce): no second call anywhere when no rank forced a row, so
        # no full-weight gather (--rollout-gather) for nothing
        if distributed.all_sum([len(forced)])[0] == 0:
            return first
        prefill = len(prompts) * max(map(len, prompts), default=0)  # the first call's prefill (padded) tokens
        second = self._second([prompts[r // n] + thoughts[r] + self.ids for r in forced], params, prefill)
        if not forced:
            return first
        return self._assemble(first, second, forced, thoughts, prompts, n)

    def _second(self, rows: list[list[int]], params: SamplingParams, limit: int) -> RolloutBatch:
        """The answer room written after each of `rows` (prompt + thought + forced ids, n=1), in chunks whose padded
        prefill (rows x longest) is at most `limit` tokens (one row at least), as the first call's, not one
        prefill of every forced row; every rank runs the most chunks any rank has (empty ones: FSDP lockstep)."""
        chunks, chunk = [], []
        for row in rows:
            if chunk and (len(chunk) + 1) * max(len(row), *map(len, chunk)) > limit:
                chunks.append(chunk)
                chunk = []
            chunk.append(row)
        chunks += [chunk] if chunk else []
        chunks += [[] for _ in range(max(1, int(distributed.all_max(len(chunks)))) - len(chunks))]
        params = dataclasses.replace(params, n=1, max_new_tokens=self.answer_room)
        made = [self.engine.generate(chunk, params) for chunk in chunks]
        return concat_batches([b for b, chunk in zip(made, chunks) if chunk] or [made[0]], self.pad)

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
