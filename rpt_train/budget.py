"""The thinking budget of issue 34 as plain functions of the run's options: what each step generates and what the
memory plan must hold. A leaf module (rpt_train.plan and rpt_train.update read it; rpt_train.objectives builds on it)."""
from __future__ import annotations

from rpt_common.errors import UserError
from rpt_train.reward import ANSWER_OPENINGS, THINK_END

THINK_CLOSE_AUTO = "auto"  # --think-close's default: </think>, a newline, then --answer-format's opening


# ---- thinking budget --------------------------------------------------------------------------------------------
def think_budget(cfg, step: int) -> int:
    """Thinking tokens allowed at training step `step` (1-based): --think-budget, moving linearly to
    --think-budget-final over the first --think-decay-steps steps, then staying there; 0 = no budget."""
    start = getattr(cfg, "think_budget", 0)
    if start <= 0:
        return 0
    final = cfg.think_budget_final if cfg.think_budget_final is not None else start
    if cfg.think_decay_steps <= 0:
        return start
    frac = min(1.0, max(0, step - 1) / cfg.think_decay_steps)
    return int(round(start + (final - start) * frac))


def new_tokens(cfg, step: int) -> int:
    """Generated tokens per rollout at `step`: --max-new-tokens without a budget; with one, the budget plus
    --answer-room for rpt (think, then answer), the budget alone for rlp (the completion is the thought)."""
    budget = think_budget(cfg, step)
    if budget <= 0:
        return cfg.max_new_tokens
    return budget if getattr(cfg, "objective", "rpt") == "rlp" else budget + cfg.answer_room


def think_close(cfg) -> str:
    """The forced text of --think-overflow close: --think-close, or (auto) `</think>`, a newline and the opening of
    --answer-format (`\\boxed{`, `<answer>`), so the answer the policy writes next is one the reward reads."""
    text = getattr(cfg, "think_close", THINK_CLOSE_AUTO)
    if text != THINK_CLOSE_AUTO:
        return text
    return f"{THINK_END}\n{ANSWER_OPENINGS[getattr(cfg, 'answer_format', 'boxed')]}"


def check_think_close(cfg) -> None:
    """--think-close starts with `</think>` and does not open another --answer-format's answer (one sentence)."""
    text, fmt = think_close(cfg), getattr(cfg, "answer_format", "boxed")
    if not text.startswith(THINK_END):
        raise UserError(f"--think-close must start with {THINK_END} (or be {THINK_CLOSE_AUTO})")
    for other, opening in ANSWER_OPENINGS.items():
        if other != fmt and text.endswith(opening):
            raise UserError(f"--think-close {text!r} opens a {other} answer but --answer-format is {fmt}, whose "
                            f"answers the reward reads: use --think-close {THINK_CLOSE_AUTO} (or end it with "
                            f"{ANSWER_OPENINGS[fmt]!r})")


def forced_bound(cfg) -> int:
    """--think-overflow close: tokens the forced text --think-close takes at most, whatever the tokenizer (one a
    byte at most; the plan runs before the tokenizer is loaded); 0 otherwise."""
    if getattr(cfg, "think_overflow", "fail") != "close":
        return 0
    return len(think_close(cfg).encode("utf-8"))


def sampled_new_tokens(cfg) -> int:
    """The most tokens a completion of the run samples: --max-new-tokens, or the budget at its largest (+ the
    answer room). A forced row samples no more (thought <= budget, then the answer room); its forced ids are not
    samples. dr_grpo's constant."""
    if getattr(cfg, "think_budget", 0) <= 0:
        return cfg.max_new_tokens
    return max(new_tokens(cfg, 1), new_tokens(cfg, 1 + max(0, cfg.think_decay_steps)))


def planned_new_tokens(cfg) -> int:
    """The longest completion of the run (what the memory plan must hold): the sampled tokens at most, + the
    forced text of --think-overflow close (a forced row: budget thought + forced ids + --answer-room)."""
    if getattr(cfg, "think_budget", 0) <= 0:
        return cfg.max_new_tokens
    return sampled_new_tokens(cfg) + forced_bound(cfg)


# ---- an eval's generation settings ---------------------------------------------------------------------------
EVAL_GENERATION = ("think_overflow", "think_close", "answer_room", "think_budget", "max_new_tokens")


def eval_generation(run) -> dict:
    """The generation settings (EVAL_GENERATION) of an eval of a run, from its options (a TrainConfig, or anything
    with its budget options, `steps` and `objective`): what its last step generated. Its in-run --eval-every evals
    and `rpt-train eval` of its directory both take these. --max-new-tokens: the tokens its last step wrote (the
    budget there + --answer-room; rlp: the budget; no budget: --max-new-tokens); --think-budget: the budget at its
    last step under --think-overflow close (the thought is cut and forced there), else 0 (fail uses none)."""
    last = max(1, int(run.steps))
    close = getattr(run, "think_overflow", "fail") == "close"
    return {"think_overflow": getattr(run, "think_overflow", "fail"), "answer_room": run.answer_room,
            "think_close": getattr(run, "think_close", THINK_CLOSE_AUTO),
            "think_budget": think_budget(run, last) if close else 0, "max_new_tokens": new_tokens(run, last)}


def eval_rule(cfg) -> str:
    """What each completion of an eval writes, in words (its progress label and notes)."""
    if getattr(cfg, "think_overflow", "fail") == "close":
        return (f"of <= {cfg.think_budget:,}+{cfg.answer_room:,} tokens each; a thought without {THINK_END} in its "
                f"first {cfg.think_budget:,} is cut there, closed by force and answered in {cfg.answer_room:,} more")
    return f"of <= {cfg.max_new_tokens:,} tokens each"
