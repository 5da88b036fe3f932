"""`--sampler learnability`: draw the contexts whose groups will carry a gradient.

A group of G rollouts teaches nothing when all its rewards agree. If the policy answers a context correctly with
probability p, that happens with probability p^G + (1 - p)^G, so of a pool of `--sampler-pool` x the contexts a
step needs, the sampler keeps those with the largest 1 - p^G - (1 - p)^G. p is read from one batched forward of
the pool's prompts (which must end where the answer starts: `--response-prefix '\\boxed{'`): the policy's
probability that its first answer token is a non-empty prefix of the label. It is recomputed every step with the
current weights, so the choice follows the policy as it learns. The other contexts of the pool are used up (the
stream moves past them), as uniform drawing would have."""
from __future__ import annotations

import numpy as np
import torch

from rpt_common.errors import UserError
from rpt_train import distributed
from rpt_train.decoding import decode_batch_after
from rpt_train.rollout import autocast_bf16

SAMPLERS = ("uniform", "learnability")
_LEFT_TOKENS = 2  # prompt tokens a first answer token is read after (the response prefix's end); a table per tail


def check_sampler(cfg) -> None:
    """The learnability score reads the first answer token right after the prompt: refuse prompts where the
    policy would first write something else (a chat reply, a thinking block)."""
    if cfg.sampler == "learnability" and not cfg.response_prefix.rstrip().endswith(
            "\\boxed{" if cfg.answer_format == "boxed" else "<answer>"):
        raise UserError("--sampler learnability scores the policy's first answer token, so the prompt must end where "
                        "the answer starts: pass --response-prefix '\\boxed{' (or '<answer>' with --answer-format "
                        f"answer_tag); got --response-prefix {cfg.response_prefix!r}")


def informative(p: np.ndarray, group_size: int) -> np.ndarray:
    """Probability that G rollouts, each correct with probability p, do not all agree."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    return 1.0 - p ** group_size - (1.0 - p) ** group_size


class LearnabilityScorer:
    """P(first answer token is a non-empty prefix of the label | prompt) under the current policy."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 16, bf16: bool = False):
        self.model, self.tokenizer, self.batch_size, self.bf16 = model, tokenizer, batch_size, bf16
        self._by_text: dict[tuple[int, ...], dict[str, list[int]]] = {}  # per left context

    def by_text(self, left: tuple[int, ...] = ()) -> dict[str, list[int]]:
        """Every token's text as it reads after the token ids `left` (a SentencePiece decoder drops the leading
        space of a token decoded alone), mapped to the tokens that write it."""
        if left not in self._by_text:
            pieces = decode_batch_after(self.tokenizer, [left] * len(self.tokenizer),
                                        [[i] for i in range(len(self.tokenizer))])
            table: dict[str, list[int]] = {}
            for i, piece in enumerate(pieces):
                if piece and "\ufffd" not in piece:  # a lone piece of a multi-byte character spells nothing
                    table.setdefault(piece, []).append(i)
            if len(self._by_text) >= 16:  # prompts end alike (the response prefix); a bound all the same
                self._by_text.clear()
            self._by_text[left] = table
        return self._by_text[left]

    def label_ids(self, label: str, prompt: list[int] = ()) -> list[int]:
        """Token ids whose text, written right after `prompt`, is a non-empty prefix of `label`."""
        table = self.by_text(tuple(prompt[-_LEFT_TOKENS:]))
        return [i for n in range(1, len(label) + 1) for i in table.get(label[:n], ())]

    @torch.no_grad()
    def probabilities(self, prompts: list[list[int]], labels: list[str]) -> np.ndarray:
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, p in enumerate(chunk):  # left padding: the last position is every prompt's own last token
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            # no KV cache (a model's default, use_cache=True, would keep every layer's keys and values of the
            # whole chunk until the forward returns: 94 GiB at 14B for 256 prompts x 1024 tokens) and the
            # logits of the one position read
            with autocast_bf16(device, self.bf16):
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), use_cache=False, logits_to_keep=1).logits[:, -1]
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            for r, label in enumerate(labels[i:i + self.batch_size]):
                hit = self.label_ids(label, chunk[r])
                out.append(float(probs[r, hit].sum()) if hit else 0.0)
        return np.array(out)


def pool_probabilities(scorer: LearnabilityScorer, prompts: list[list[int]], labels: list[str]) -> np.ndarray:
    """p for the whole pool. Under torchrun each rank scores its stripe (contexts r, r+W, ...), padded with a
    repeat so every rank runs as many forwards as the others (FSDP gathers each layer's weights in lockstep),
    and the stripes are gathered: the pool costs each rank 1/W of its forwards."""
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1 or not prompts:
        return scorer.probabilities(prompts, labels)
    mine = list(range(rank, len(prompts), world))
    rows = mine + [mine[0] if mine else 0] * (-(-len(prompts) // world) - len(mine))
    p_mine = scorer.probabilities([prompts[i] for i in rows], [labels[i] for i in rows])[:len(mine)]
    p = np.zeros(len(prompts))
    for r, values in enumerate(distributed.all_gather_objects(p_mine.tolist())):
        p[r::world] = values
    return p


def choose(samples: list, prompts: list[list[int]], scorer: LearnabilityScorer, k: int,
           group_size: int) -> tuple[list[int], np.ndarray]:
    """Indices (draw order) of the k samples most likely to give an informative group, and every sample's p.
    Under torchrun the ranks score stripes of the pool, share the p, and follow rank 0's choice."""
    p = pool_probabilities(scorer, prompts, ["".join(s.label_tokens) for s in samples])
    score = informative(p, group_size)
    order = np.argsort(-score, kind="stable")[:k]
    chosen = sorted(int(i) for i in order)
    if distributed.world_size() > 1:
        chosen = distributed.all_gather_objects(chosen)[0]
    return chosen, p
