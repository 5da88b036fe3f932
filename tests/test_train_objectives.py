"""Issue 34's objectives: rlp's information-gain reward against a hand computation, the EMA update and its
restore on resume, the next-token term (value and gradient), the thinking budget (schedule, truncation = no
answer, memory plan), the entropy curriculum over steps, and rlp under FSDP2 on 2 ranks equal to one process."""
import copy
import dataclasses
import json

import pytest
import torch
from shard_fixtures import length_reward, train_shards, tiny_tok  # noqa: F401

from rpt_common.bos import encode_with_bos
from rpt_train import objectives
from rpt_train.checkpoint import latest_checkpoint
from rpt_train.config import TrainConfig
from rpt_train.policy import load_policy
from rpt_train.reward import RewardInput, rpt_reward
from rpt_train.rlp import InfoGainReward, ThinkPrompt
from rpt_train.rollout import SamplingParams
from rpt_train.samples import TrainSamples
from rpt_train.templates import PromptBuilder
from rpt_train.trainer import collect, train, update_policy

TIMING = ("seconds", "rollout_seconds", "rollout_tokens_per_s")


def hand_logprob(model, ids: list[int], targets: list[int]) -> float:
    """sum log p(targets | ids) from the model's plain full forward (float64 log-softmax)."""
    full = torch.tensor([ids + targets])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(targets)))


@pytest.mark.parametrize("k", [1, 2])
def test_info_gain_reward_equals_a_hand_computation(tiny_llama, k):
    """reward = log p_policy(first k true tokens | context <think> thought </think>) - log p_EMA(same | context),
    the thought cut at its first </think>; the EMA copy here differs from the policy."""
    policy = load_policy(str(tiny_llama), "cpu")
    tok, model = policy.tokenizer, policy.model.eval()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = [RewardInput(completion=c, answer=None, label_tokens=lab, context=ctx)
             for ctx, lab, thoughts in [("The quick brown", [" fox", " jumps"], ["maybe fox", "a dog</think> tail"]),
                                        ("Let x_n be the", [" number", " of"], ["", "count"])]
             for c in thoughts]
    fn = InfoGainReward(model, ema, tok, tokens=k, batch_size=3)
    got = fn(items)
    for it, r in zip(items, got):
        ctx = encode_with_bos(tok, [it.context])[0]  # the cuts here fall between tokens
        joint = tok(it.context + "".join(it.label_tokens), add_special_tokens=False)["input_ids"]
        assert joint[:len(ctx)] == ctx
        label = joint[len(ctx):][:k]
        thought = it.completion.split("</think>")[0]
        cond = encode_with_bos(tok, [it.context + "<think>" + thought + "</think>"])[0]  # one encoding of the text
        want = hand_logprob(model, cond, label) - hand_logprob(ema, ctx, label)
        assert r == pytest.approx(want, abs=1e-4)
        assert len(label) == k
    assert got[0] != got[1]  # the thought matters
    assert fn.ema_tokens > 0 and fn.tokens > fn.ema_tokens  # accounted: policy and EMA forwards


def test_think_prompt_is_the_raw_context_then_think(tiny_tok):
    prompt = ThinkPrompt(tiny_tok)
    assert prompt.ids("Hello") == encode_with_bos(tiny_tok, ["Hello<think>"])[0]
    assert prompt.completion("abc") == "abc"


def test_ema_update_formula_and_it_follows_each_optimizer_step(tiny_llama, train_shards):
    policy = load_policy(str(tiny_llama), "cpu").model
    ema = objectives.Ema(copy.deepcopy(policy), rate=0.75)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    before = [e.detach().clone() for e in ema.model.parameters()]
    ema.update(policy)
    for b, e, p in zip(before, ema.model.parameters(), policy.parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p, rtol=0, atol=1e-6)
    # attached: one EMA update per optimizer step, none without one
    cfg = TrainConfig(shards=str(train_shards), objective="rlp", think_budget=4, ema_rate=0.75)
    obj = objectives.Objective(cfg, None, ema)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    obj.attach(policy, opt)
    first = [e.detach().clone() for e in ema.model.parameters()]
    opt.step()
    for f, e, p in zip(first, ema.model.parameters(), policy.parameters()):
        torch.testing.assert_close(e, 0.75 * f + 0.25 * p, rtol=0, atol=1e-6)


RLP = dict(bucket="all", batch_prompts=2, group_size=2, objective="rlp", think_budget=3, ema_rate=0.5, lr=1e-2,
           save_every=1, keep_checkpoints=4, log_samples_every=0, micro_batch_size=2, rlp_tokens=2)


def _metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(out / "metrics.jsonl")]


def test_rlp_run_resume_restores_the_ema_copy_exactly(tiny_llama, train_shards, tmp_path):
    """2 steps in one go equal 1 step then --resume to 2: metrics (the reward reads the EMA) and the saved EMA
    weights, which are neither the policy's nor the base model's."""
    base = RLP | {"shards": str(train_shards), "model": str(tiny_llama)}
    full = train(TrainConfig(**base, out=str(tmp_path / "full"), steps=2), quiet=True)
    part = train(TrainConfig(**base, out=str(tmp_path / "part"), steps=1), quiet=True)
    train(TrainConfig(**base, out=str(tmp_path / "part"), steps=2, resume=True), quiet=True)
    a, b = _metrics(full), _metrics(part)
    assert [m["step"] for m in a] == [1, 2] and a == b
    assert all(m["objective_forward_tokens"] > m["rlp_ema_forward_tokens"] > 0 for m in a)
    assert all(m["forward_tokens"] >= m["rollout_tokens"] + m["objective_forward_tokens"] for m in a)
    sa = torch.load(latest_checkpoint(full) / "trainer_state.pt", weights_only=False)["ema"]
    sb = torch.load(latest_checkpoint(part) / "trainer_state.pt", weights_only=False)["ema"]
    start = load_policy(str(tiny_llama), "cpu").model.state_dict()
    now = load_policy(str(latest_checkpoint(full)), "cpu").model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)
    assert max(float((sa[k] - start[k]).abs().max()) for k in sa) > 1e-4  # it moved
    assert max(float((sa[k] - now[k]).abs().max()) for k in sa) > 1e-4  # and lags the policy


class ScriptedEngine:
    """Completions of 2 tokens 'c'."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, params):
        from rpt_train.rollout import RolloutBatch

        n = len(prompts) * params.n
        ones = torch.ones(n, 2, dtype=torch.long)
        return RolloutBatch(prompt_ids=ones, prompt_mask=ones, completion_ids=ones * 5, completion_mask=ones,
                            logprobs=None, texts=["c"] * n)

    def sync(self, model):
        pass


def test_ntp_term_equals_a_hand_cross_entropy_and_its_gradient_is_added(tiny_llama, train_shards):
    """With --ntp-weight w, the update's weight change minus the plain RL update's is -lr x w x grad(CE) (SGD, no
    clipping), CE the mean next-token cross-entropy over the tokens of the batch's contexts and their next token."""
    policy = load_policy(str(tiny_llama), "cpu")
    tok = policy.tokenizer
    cfg = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=3, group_size=2, ntp_weight=0.7,
                      grad_clip=0.0, micro_batch_size=2)
    rewards = iter([[1, 0, 0, 1, 1, 0]])
    batch, _, _ = collect(cfg, TrainSamples(cfg, tok), PromptBuilder(tok), ScriptedEngine(tok),
                          lambda items: [float(x) for x in next(rewards)], SamplingParams(n=2))
    start = copy.deepcopy(policy.model.state_dict())

    def step(ntp):
        policy.model.load_state_dict(start)
        opt = torch.optim.SGD(policy.model.parameters(), lr=1.0)
        stats = update_policy(cfg, policy.model, None, opt, batch, ntp=ntp)
        return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, stats

    term = objectives.NtpTerm(cfg, tok)
    with_ntp, s1 = step(term)
    plain, s0 = step(None)
    # the hand term: full forward, cross-entropy over every predicted token of the 3 contexts
    policy.model.load_state_dict(start)
    policy.model.zero_grad()
    seqs = [encode_with_bos(tok, [s.context + s.label_tokens[0]])[0] for s in batch.samples]
    total = sum(len(s) - 1 for s in seqs)
    ce = sum(torch.nn.functional.cross_entropy(policy.model(input_ids=torch.tensor([s])).logits[0, :-1],
                                               torch.tensor(s[1:]), reduction="sum") for s in seqs) / total
    (0.7 * ce).backward()
    assert s1["loss"] - s0["loss"] == pytest.approx(0.7 * float(ce), rel=1e-4)
    assert term.tokens == sum(map(len, seqs))
    grads = dict(policy.model.named_parameters())
    for name, p in grads.items():
        torch.testing.assert_close(with_ntp[name] - plain[name], -p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_think_budget_schedule_truncation_and_plan(train_shards):
    cfg = TrainConfig(shards=str(train_shards), think_budget=100, think_budget_final=20, think_decay_steps=8,
                      answer_room=10, template="think", reward_no_answer=-0.5)
    assert [objectives.think_budget(cfg, s) for s in (1, 5, 9, 50)] == [100, 60, 20, 20]
    assert objectives.new_tokens(cfg, 1) == 110 and objectives.planned_new_tokens(cfg) == 110
    rise = TrainConfig(shards=str(train_shards), think_budget=16, think_budget_final=64, think_decay_steps=4)
    assert objectives.planned_new_tokens(rise) == 64 + 16
    assert objectives.new_tokens(TrainConfig(shards=str(train_shards), max_new_tokens=7), 3) == 7
    # a thought cut by the budget (no </think>) gets the no-answer reward, even with the right answer inside
    fn = objectives.Objective(cfg, None).reward(rpt_reward(1.0, 0.0, -0.5), None)
    items = [RewardInput(completion=c, answer=a, label_tokens=[" fox"], context="The quick brown")
             for c, a in [("<think>it is \\boxed{ fox}", " fox"), ("<think>hm</think>\\boxed{ fox}", " fox"),
                          ("<think>hm</think>\\boxed{ dog}", " dog")]]
    assert fn(items) == [-0.5, 1.0, 0.0]
    # the memory plan holds the largest budget + answer room
    from rpt_train.plan import Shapes, plan_memory

    shapes = Shapes(params=10**6, layers=2, hidden=64, intermediate=128, kv_dim=64, vocab=320, layer_params=10**5)
    plain = plan_memory(TrainConfig(shards=str(train_shards), max_new_tokens=16), shapes, prompt_tokens=50)
    planned = plan_memory(cfg, shapes, prompt_tokens=50)
    assert "+ 110 new" in planned.notes[0] and planned.terms["kv_cache"] > plain.terms["kv_cache"]
    rlp = plan_memory(TrainConfig(shards=str(train_shards), objective="rlp", think_budget=16), shapes, prompt_tokens=50)
    assert rlp.terms["weights"] == 2 * plain.terms["weights"]  # the EMA copy


def test_the_curriculum_draws_each_steps_bucket(train_shards, tiny_tok):
    """Every sample of a step comes from the step's bucket (thresholds at quantiles of the data, so the buckets
    differ); the per-bucket orders survive a state_dict round trip."""
    probe = TrainSamples(TrainConfig(shards=str(train_shards), bucket="all"), tiny_tok).next_batch(60)
    q = torch.tensor([s.entropy for s in probe]).quantile(torch.tensor([0.2, 0.5, 0.8])).tolist()
    from rpt_train.config import load_config

    cfg = load_config(TrainConfig, None, {"shards": str(train_shards), "curriculum": ("hard,easy,medium",),
                                          "curriculum_steps": "2,4", "bucket_thresholds": ",".join(map(str, q))})
    assert cfg.curriculum == ["hard", "easy", "medium"]
    assert [objectives.curriculum_bucket(cfg, s) for s in range(1, 7)] == ["hard", "hard", "easy", "easy",
                                                                           "medium", "medium"]
    data = objectives.train_samples(cfg, tiny_tok, None)
    floor = {"easy": q[0], "medium": q[1], "hard": q[2]}
    seen = []
    for step in range(1, 7):
        data.set_step(step)
        drawn = data.next_batch(5)
        assert all(s.entropy > floor[objectives.curriculum_bucket(cfg, step)] for s in drawn), step
        seen += [s.entropy for s in drawn]
    assert min(seen) <= q[2]  # the easy stage drew below the hard threshold
    state = data.state_dict()
    again = objectives.train_samples(cfg, tiny_tok, None)
    again.load_state_dict(state)
    data.set_step(3), again.set_step(3)
    assert [s.key for s in data.next_batch(4)] == [s.key for s in again.next_batch(4)]
    obj = objectives.Objective(cfg, tiny_tok)  # each step's metrics name the bucket it drew from
    for step, bucket in ((1, "hard"), (3, "easy"), (6, "medium")):
        obj.begin_step(step, data, SamplingParams(n=2))
        stats = obj.step_stats()
        assert stats["bucket"] == bucket and "think_budget" not in stats


def test_objective_options_are_checked(train_shards):
    from rpt_common.errors import UserError
    from rpt_train.config import load_config

    for bad, msg in [({"objective": "ppo"}, "--objective"), ({"curriculum": "easy,hard"}, "--curriculum-steps"),
                     ({"think_budget_final": 8}, "--think-budget-final"), ({"rlp_tokens": 9}, "--rlp-tokens"),
                     ({"ema_rate": 1.0}, "--ema-rate"), ({"think_budget": 8}, "--template 'v0' does not ask for"),
                     ({"think_budget": 8, "template": "answer-only"}, "--template")]:
        with pytest.raises(UserError, match=msg):
            load_config(TrainConfig, None, {"shards": str(train_shards), **bad})
    for fine in ({"think_budget": 8, "template": "think"}, {"think_budget": 8, "template": "think-brief"},
                 {"think_budget": 8, "objective": "rlp"}):  # rlp's prompt is the raw context and <think>
        assert load_config(TrainConfig, None, {"shards": str(train_shards), **fine}).think_budget == 8


RLP_DIST = dict(steps=2, objective="rlp", think_budget=3, ema_rate=0.5, rlp_tokens=2, ntp_weight=0.3, grad_clip=0.5)


@pytest.mark.slow  # a torchrun launch and a 1-process run: ~80 s on the shared 2-core CPU
def test_rlp_with_ntp_under_fsdp2_on_two_ranks_equals_one_process(tiny_llama, train_shards, tmp_path):
    """--objective rlp (+ --ntp-weight) on 2 gloo ranks (FSDP2: the reward's policy and EMA forwards padded to
    lockstep, an odd batch split 3 + 2) equals one process: metrics, policy weights and the saved EMA copy."""
    from dist_driver import PromptEngine
    from test_train_distributed import BASE, metrics, run_driver, weights

    from rpt_common.models import load_tokenizer

    base = BASE | {"shards": str(train_shards), "model": str(tiny_llama)}
    (tmp_path / "two").mkdir()
    root, _ = run_driver(tmp_path / "two", base, scripted=[["rlp", RLP_DIST]])
    cfg = TrainConfig(**base | RLP_DIST | {"out": str(tmp_path / "one")})
    one = train(cfg, reward_fns=[length_reward], engine=PromptEngine(load_tokenizer(cfg.model)), quiet=True)
    a, b = metrics(one), metrics(root / "rlp")
    assert [m["step"] for m in a] == [1, 2] and all(m["updates"] > 0 for m in a)
    for ma, mb in zip(a, b):
        for k in ma:
            same = ma[k] == mb[k] if not isinstance(ma[k], float) else ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6)
            assert same, (k, ma[k], mb[k])
    wa, wb = weights(one, 2), weights(root / "rlp", 2)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)
    ea = torch.load(latest_checkpoint(one) / "trainer_state.pt", weights_only=False)["ema"]
    eb = torch.load(latest_checkpoint(root / "rlp") / "trainer_state.pt", weights_only=False)["ema"]
    assert set(eb) <= set(ea) and len(eb) > 0
    for k in eb:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-4, msg=k)


def test_the_objectives_experiment_spec_loads_with_per_arm_eval(tmp_path):
    """pipelines/experiments/smollm2-champ-objectives.yaml: the three objectives are option overrides of the rpt
    arm kind, each loads as a TrainConfig; the thinking arm is evaluated with its own template and budget, the
    others with the common design."""
    from pathlib import Path

    from rpt_train.experiment import Experiment, load_spec

    spec = load_spec(str(Path(__file__).parent.parent / "pipelines/experiments/smollm2-champ-objectives.yaml"))
    exp = Experiment(spec)
    cfgs = {a: exp.train_config(spec.arms[a], check_only=True) for a in ("rpt-think", "rpt-ntp", "rlp")}
    assert cfgs["rpt-think"].think_budget == 32 and cfgs["rpt-think"].template == "think"  # results/probe-thoughts.json
    assert cfgs["rpt-ntp"].ntp_weight == 0.5 and cfgs["rlp"].objective == "rlp"
    think, common = exp.eval_config("demo", spec.arms["rpt-think"]), exp.eval_config("demo", spec.arms["rlp"])
    assert (think.template, think.response_prefix) == ("think", "")
    # budget forcing (the base model never closes its thought), evaluated with the rule and budget it ends with
    assert cfgs["rpt-think"].think_overflow == "close" and cfgs["rlp"].think_overflow == "fail"
    assert (think.think_overflow, think.think_budget, think.answer_room, think.think_close) == (
        "close", objectives.think_budget(cfgs["rpt-think"], 108), cfgs["rpt-think"].answer_room,
        cfgs["rpt-think"].think_close)
    assert common.think_overflow == "fail"
    assert (common.template, common.max_new_tokens) == ("answer-only", 10)
    assert objectives.new_tokens(cfgs["rpt-think"], 108) == 32  # 16 + 16 (+ the forced text) at the end


class VaryingEngine(ScriptedEngine):
    """Completions of 1 or 2 tokens, alternating (so a group's rows do not cancel in the loss)."""

    def generate(self, prompts, params):
        batch = super().generate(prompts, params)
        batch.completion_mask[::2, 1] = 0
        return batch


class RecordingEngine(ScriptedEngine):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.budgets = []

    def generate(self, prompts, params):
        self.budgets.append(params.max_new_tokens)
        return super().generate(prompts, params)


def test_the_budget_reaches_each_steps_rollouts_eval_and_dr_grpo_norm(tiny_llama, train_shards, tmp_path):
    """A decaying budget: the rollouts of step s get budget(s) + answer room; the in-run eval the final one; Dr.
    GRPO's constant normaliser is the run's largest generation, not the unused --max-new-tokens."""
    from rpt_train.trainer import eval_config

    cfg = TrainConfig(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / "run"), bucket="all",
                      steps=3, batch_prompts=2, group_size=2, template="think", think_budget=8, think_budget_final=4,
                      think_decay_steps=2, answer_room=2, max_sampling_rounds=1, log_samples_every=0)
    engine = RecordingEngine(load_policy(str(tiny_llama), "cpu").tokenizer)
    train(cfg, engine=engine, quiet=True)
    assert engine.budgets == [10, 8, 6]
    assert eval_config(cfg).max_new_tokens == 6
    # dr_grpo: the same batch, a budget of 6 + 2 against --max-new-tokens 8 without one: the same loss
    policy = load_policy(str(tiny_llama), "cpu")
    tok = policy.tokenizer
    common = dict(shards=str(train_shards), bucket="all", batch_prompts=2, group_size=2, loss="dr_grpo", grad_clip=0.0)
    rewards = iter([[1, 0, 1, 0]])
    batch, _, _ = collect(TrainConfig(**common), TrainSamples(TrainConfig(**common), tok), PromptBuilder(tok),
                          VaryingEngine(tok), lambda items: [float(x) for x in next(rewards)], SamplingParams(n=2))
    start = copy.deepcopy(policy.model.state_dict())
    losses = []
    for kw in ({"think_budget": 6, "answer_room": 2}, {"max_new_tokens": 8}):
        policy.model.load_state_dict(start)
        opt = torch.optim.SGD(policy.model.parameters(), lr=0.0)
        losses.append(update_policy(TrainConfig(**common | kw), policy.model, None, opt, batch)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] != 0


KINDS = ["bytelevel", "metaspace", "wordpiece"]
RLP_TEXT = "the quick brown foxes jumps over the lazy dog"


def rlp_cuts(text: str) -> list[int]:
    """Every cut before a space (word-initial labels) and inside a word (mid-word labels)."""
    return [t for t in range(3, len(text) - 12) if text[t] == " " or (text[t - 1] != " " and text[t] != " ")]


@pytest.mark.parametrize("kind", KINDS)
def test_the_scored_tokens_read_as_the_continuation_or_the_position_is_skipped(kind):
    """Every tokenizer kind, word-initial and mid-word cuts: a scored position's context ids + scored ids are the
    policy's encoding of the text and the scored ids read after the context as a non-empty prefix of the true
    continuation (the first RPT label piece); a position is skipped only when the policy's tokens cannot do that
    (a token straddles the cut). Word-initial cuts are all scored, so are mid-word cuts at policy token bounds."""
    from data_helpers import make_tokenizer_of

    from rpt_train.decoding import decode_after
    from rpt_train.rlp import split_ids
    from rpt_train.samples import _joint_tokens, label_pieces

    tok = make_tokenizer_of(kind)
    plain = tok(RLP_TEXT, add_special_tokens=False)["input_ids"]
    ends = {e for _, e in tok(RLP_TEXT, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]}
    scored = skipped = 0
    for t in rlp_cuts(RLP_TEXT):
        context, label = RLP_TEXT[:t], RLP_TEXT[t:]
        got = split_ids(tok, context, label, 2)
        ids, rest, j0 = _joint_tokens(tok, context, label)
        if got is None:
            skipped += 1
            assert RLP_TEXT[t] != " " and t not in ends, (kind, t)  # mid-word, and the cut splits a policy token
            assert rest or not label.startswith(decode_after(tok, ids[:j0], ids[j0:j0 + 2])), (kind, t)
            continue
        scored += 1
        ctx, target = got
        bos = 1 if ctx and tok.bos_token_id is not None and ctx[0] == tok.bos_token_id and plain[:1] != ctx[:1] else 0
        assert plain[:len(ctx) - bos + len(target)] == ctx[bos:] + target and len(target) == 2
        first, both = decode_after(tok, ctx, target[:1]), decode_after(tok, ctx, target)
        assert first and label.startswith(both) and first == label_pieces(tok, label, 1, left=context)[0], (kind, t)
    assert scored and (skipped or kind == "bytelevel")  # the mid-word straddles of each kind are found and skipped


def tiny_lm(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tags", ["text", "special"])
def test_rlp_reward_over_tokenizer_kinds_scores_the_continuation_after_one_encoding_of_the_condition(kind, tags):
    """The reward at word-initial and mid-word cuts, per tokenizer kind (`<think>`/`</think>` as plain text or as
    special added tokens, Qwen3-style): scored positions equal log p(target | one encoding of
    `context<think>thought</think>`) - log p_EMA(target | context) with the target the joint encoding's; a skipped
    position gives all its thoughts 0 and counts in `skipped`. The condition reads as that text (no space between
    the pieces) for the kinds whose decoder gives text back (not WordPiece, which spaces punctuation)."""
    from data_helpers import make_tokenizer_of

    from rpt_train.rlp import condition_ids, split_ids

    tok = make_tokenizer_of(kind)
    if tags == "special":
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    policy, ema = tiny_lm(len(tok), 0), tiny_lm(len(tok), 1)
    cuts = [t for t in rlp_cuts(RLP_TEXT) if t % 3 == 0 or RLP_TEXT[t] == " "]
    items = [RewardInput(completion=c, answer=None, label_tokens=[RLP_TEXT[t:t + 6], RLP_TEXT[t + 6:t + 12]],
                         context=RLP_TEXT[:t]) for t in cuts for c in (" maybe fox</think> tail", " a dog")]
    fn = InfoGainReward(policy, ema, tok, tokens=1, batch_size=4)
    got = fn(items)
    skipped = 0
    for it, r in zip(items, got):
        label = "".join(it.label_tokens)
        split = split_ids(tok, it.context, label, 1)
        if split is None:
            skipped += it.completion == " a dog"  # one per position
            assert r == 0.0
            continue
        ctx, target = split
        thought = it.completion.split("</think>")[0]
        cond = condition_ids(tok, it.context, thought)
        assert cond == encode_with_bos(tok, [it.context + "<think>" + thought + "</think>"])[0]
        if kind != "wordpiece":  # and the rollout prompt reads as the context then <think>
            assert tok.decode(cond, skip_special_tokens=False).endswith(it.context + "<think>" + thought + "</think>")
            assert tok.decode(ThinkPrompt(tok).ids(it.context), skip_special_tokens=False).endswith(
                it.context + "<think>")
        assert r == pytest.approx(hand_logprob(policy, cond, target) - hand_logprob(ema, ctx, target), abs=1e-4)
    assert fn.skipped == skipped and skipped < len(cuts) and (skipped or kind == "bytelevel")
    assert len(fn.gains) == len(items) - 2 * skipped


@pytest.mark.parametrize("kind", KINDS)
def test_rlp_groups_with_the_same_context_are_each_scored_against_their_own_continuation(kind):
    """Two groups in one call with the same context text but different true continuations (duplicated boilerplate,
    contexts cut to the same last tokens) get the rewards each gets alone; a third group equal to the first in
    context and continuation gets the first's rewards (one shared baseline, equal scores)."""
    from data_helpers import make_tokenizer_of

    tok = make_tokenizer_of(kind)
    policy, ema = tiny_lm(len(tok), 0), tiny_lm(len(tok), 1)
    thoughts = (" maybe", " a dog")
    a, b = ([RewardInput(completion=c, answer=None, label_tokens=lab, context="the quick brown") for c in thoughts]
            for lab in ([" fox", " jumps"], [" dog", " sleeps"]))
    alone = [InfoGainReward(policy, ema, tok, tokens=2)(g) for g in (a, b)]
    fn = InfoGainReward(policy, ema, tok, tokens=2, batch_size=3)
    together = fn(a + b + a)
    assert alone[0] != alone[1]  # the continuations differ in what they score
    for got, want in zip((together[:2], together[2:4], together[4:]), (alone[0], alone[1], alone[0])):
        assert got == pytest.approx(want, abs=1e-5)
    assert fn.skipped == 0 and len(fn.gains) == 6


BRACE_CUTS = [("f = x", "} + {y} and more words here"), ("let a = b", " } c d e f g h"),
              ("let a = b", " c } d e f g h")]


@pytest.mark.parametrize("kind", KINDS)
def test_rlp_labels_are_the_true_next_tokens_uncut_where_rpt_cuts_them_to_an_answer(kind, train_shards):
    """--objective rlp writes no answer: a position whose continuation starts with (or soon has) an unbalanced '}'
    keeps its --labels-length true next tokens and the reward scores --rlp-tokens of them; under rpt the same
    labels are still cut to the longest prefix a \\boxed{} answer can express (the position dropped, counted in
    `unexpressible`, when none can). The test's WordPiece vocabulary has no braces: they are added."""
    from data_helpers import make_tokenizer_of

    from rpt_train.rlp import split_ids
    from rpt_train.samples import answerable, label_pieces

    tok = make_tokenizer_of(kind)
    if kind == "wordpiece":
        tok.add_tokens(["{", "}"])
    build = {obj: TrainSamples(TrainConfig(shards=str(train_shards), objective=obj, labels_length=4,
                                           rlp_tokens=4), tok).build for obj in ("rpt", "rlp")}
    row, usable, dropped = {"doc_id": "d", "window_index": 0}, 0, 0
    for context, continuation in BRACE_CUTS:
        full = label_pieces(tok, continuation, 4, left=context)
        if len(full) < 4:  # WordPiece spaces punctuation: a '}' glued to the context cannot be given back
            assert kind == "wordpiece", (kind, context, full)
            continue
        usable += 1
        rlp, rpt = (build[obj]._sample(row, (context, continuation), "", 3, 1.0) for obj in ("rlp", "rpt"))
        assert rlp.label_tokens == full and "}" in "".join(full), (kind, context, full)
        ctx, target = split_ids(tok, context, "".join(rlp.label_tokens), 4)
        assert len(target) == 4  # --rlp-tokens 4 scores 4 tokens
        cut = answerable(full)
        assert len(cut) < 4 and (rpt.label_tokens if rpt else []) == cut  # rpt unchanged: cut, or dropped
        dropped += rpt is None
    assert usable >= 2 and dropped >= 1
    assert build["rpt"].unexpressible == dropped and build["rlp"].unexpressible == build["rlp"].skipped == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tags", ["text", "special"])
def test_rlp_refuses_at_start_up_a_tokenizer_that_does_not_read_back_its_close_tag(kind, tags, train_shards):
    """A WordPiece decoder reads the policy's own `</think>` back as '< / think >': rlp would score the whole
    completion as the thought and train all of it, so `Objective.build` refuses it (before loading the EMA copy)
    with one UserError naming the read-back text. Byte-level and Metaspace tokenizers, and WordPiece with the think
    tags as special added tokens (Qwen3-style), read it back and are accepted."""
    from data_helpers import make_tokenizer_of

    from rpt_common.errors import UserError
    from rpt_train.rlp import check_tokenizer

    tok = make_tokenizer_of(kind)
    if tags == "special":
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    if kind == "wordpiece" and tags == "text":
        with pytest.raises(UserError, match=r"--objective rlp.*reads back as ' the next word is < / think >'"):
            objectives.Objective.build(TrainConfig(shards=str(train_shards), objective="rlp"), None, tok, "cpu",
                                       None, torch.float32)
    else:
        check_tokenizer(tok)


def close_tokenizer(tiny_tok, special: bool):
    """tiny_llama's tokenizer with `<think>`/`</think>` as special added tokens (skip_special_tokens drops them),
    or unchanged (`</think>` several plain tokens)."""
    tok = copy.deepcopy(tiny_tok)
    if special:
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    return tok


class WritingEngine:
    """Every completion is the tokens of `text`, decoded as HFRollout decodes them (rollout.completion_texts)."""

    def __init__(self, tokenizer, text):
        self.tokenizer, self.text = tokenizer, text

    def generate(self, prompts, params):
        from rpt_train.rollout import RolloutBatch, completion_texts

        ids = self.tokenizer(self.text, add_special_tokens=False)["input_ids"]
        n = len(prompts) * params.n
        comp = torch.tensor([ids] * n)
        width = max(map(len, prompts))
        pids = torch.tensor([[0] * (width - len(p)) + p for p in prompts]).repeat_interleave(params.n, 0)
        pmask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(params.n, 0)
        return RolloutBatch(prompt_ids=pids, prompt_mask=pmask, completion_ids=comp,
                            completion_mask=torch.ones_like(comp), logprobs=torch.full(comp.shape, -1.0),
                            texts=completion_texts(self.tokenizer, prompts, params.n, comp, torch.ones_like(comp)),
                            entropy=torch.ones(comp.shape))

    def sync(self, model):
        pass


@pytest.mark.parametrize("special", [False, True])
def test_think_budget_reward_sees_a_close_tag_the_tokenizer_calls_special(tiny_tok, train_shards, special):
    """One collect round under --think-budget: a completion that closes its thought with `</think>` is rewarded
    for its answer (here wrong: 0.5), not given the no-answer reward (0), also when the tokenizer registers
    `</think>` as a special token (Qwen3-style), which decoding without special tokens used to drop."""
    tok = close_tokenizer(tiny_tok, special)
    cfg = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=2, group_size=2, template="think",
                      think_budget=8, answer_room=8, dynamic_sampling=False)
    engine = WritingEngine(tok, " hm</think>\\boxed{ zzzq}")
    reward = objectives.Objective(cfg, tok).reward(rpt_reward(1.0, 0.5, 0.0), None)
    batch, _, stats = collect(cfg, TrainSamples(cfg, tok), PromptBuilder(tok, "think"), engine, reward,
                              SamplingParams(n=2))
    assert batch.rollouts.texts[0] == " hm</think>\\boxed{ zzzq}"
    assert batch.rewards.tolist() == [0.5] * 4 and stats["answer_rate"] == 1.0


@pytest.mark.parametrize("special", [False, True])
def test_rlp_trains_the_thought_up_to_its_first_close_tag(tiny_tok, train_shards, special):
    """rlp's update rows: each completion masked after the token that completes its first `</think>` (that token
    kept; old log-probs and entropy masked alike), `</think>` one special token or several plain ones; a thought
    cut by the budget (no `</think>`) stays whole; plain RPT rows are not touched."""
    from rpt_train.rlp import thought_rows

    tok = close_tokenizer(tiny_tok, special)
    cfg = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=2, group_size=2, objective="rlp",
                      think_budget=16, dynamic_sampling=False)
    rewards = iter([[1.0, 0.0, 0.5, 0.25]])
    head, tail = " a b</think>", " c</think> d"
    engine = WritingEngine(tok, head + tail)
    batch, _, _ = collect(cfg, TrainSamples(cfg, tok), objectives.Objective(cfg, tok).prompts(None), engine,
                          lambda items: next(rewards), SamplingParams(n=2))
    keep = len(tok(head, add_special_tokens=False)["input_ids"])
    assert len(tok(head + tail, add_special_tokens=False)["input_ids"]) > keep
    trained = objectives.Objective(cfg, tok).trained(batch).rollouts
    assert trained.completion_mask.sum(1).tolist() == [keep] * 4
    assert tok.decode(trained.completion_ids[0, :keep], skip_special_tokens=False) == head
    assert (trained.logprobs == -trained.completion_mask).all() and (trained.entropy == trained.completion_mask).all()
    assert batch.rollouts.completion_mask.all()  # the collected batch (its stats) is left as generated
    cut = dataclasses.replace(batch.rollouts, texts=[" a b c"] * 4)  # no </think> in the text: whole
    assert thought_rows(tok, cut).completion_mask.all()
    plain = TrainConfig(shards=str(train_shards), bucket="all", think_budget=16, template="think")
    assert objectives.Objective(plain, tok).trained(batch) is batch


# ---- --think-overflow close: budget forcing --------------------------------------------------------------------
FILLER, ANSWER = " hm", " zzzq}"  # a thought that never closes; the answer written after the forced text


class NeverCloses:
    """A thought of FILLER tokens up to the call's --max-new-tokens (no `</think>`, no EOS); a prompt that ends
    with the forced ids (the second call of budget forcing) gets the ANSWER tokens instead. Records each call's
    (prompts, max_new_tokens). Sampler log-probs -1 and entropies 1 on every generated token."""

    def __init__(self, tokenizer, close=None):
        from rpt_train.overflow import THINK_CLOSE, forced_ids

        self.tokenizer, self.calls = tokenizer, []
        self.forced = forced_ids(tokenizer, close or THINK_CLOSE)
        self.filler = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
        self.answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]

    def generate(self, prompts, params):
        from rpt_train.rollout import RolloutBatch, completion_texts, empty_batch

        self.calls.append(([list(p) for p in prompts], params.max_new_tokens))
        if not prompts:
            return empty_batch()
        k = params.max_new_tokens
        rows = [(self.answer if p[-len(self.forced):] == self.forced else self.filler * k)[:k]
                for p in prompts for _ in range(params.n)]
        C, width = max(map(len, rows)), max(map(len, prompts))
        comp = torch.tensor([r + [0] * (C - len(r)) for r in rows])
        cmask = torch.tensor([[1] * len(r) + [0] * (C - len(r)) for r in rows])
        pids = torch.tensor([[0] * (width - len(p)) + p for p in prompts]).repeat_interleave(params.n, 0)
        pmask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(params.n, 0)
        return RolloutBatch(prompt_ids=pids, prompt_mask=pmask, completion_ids=comp, completion_mask=cmask,
                            logprobs=-cmask.float(), entropy=cmask.float(),
                            texts=completion_texts(self.tokenizer, prompts, params.n, comp, cmask))

    def sync(self, model):
        pass


def overflow_cfg(train_shards, overflow, **kw):
    return TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=2, group_size=2, template="think",
                       think_budget=5, answer_room=8, think_overflow=overflow, dynamic_sampling=False, **kw)


def overflow_collect(cfg, tok, rewards=None):
    """One collect round of `cfg` through the trainer's objective hooks (engine, budget, gated reward)."""
    obj = objectives.Objective(cfg, tok)
    raw = NeverCloses(tok)
    engine = obj.engine(raw)
    params = obj.begin_step(1, None, SamplingParams(n=cfg.group_size))
    reward = (lambda items: next(rewards)) if rewards else obj.reward(rpt_reward(1.0, 0.5, 0.0), None)
    batch, _, stats = collect(cfg, TrainSamples(cfg, tok), PromptBuilder(tok, "think"), engine, reward, params)
    return batch, stats, obj, raw


def test_think_overflow_fail_gives_no_answer_and_close_forces_the_answer(tiny_tok, train_shards):
    """A policy that never closes its thought: with fail every rollout gets the no-answer reward (a null arm);
    with close each completion is the budget's thought tokens + the forced ids of '</think>\\n\\boxed{' + the
    answer written after them, rewarded on that answer (wrong here: 0.5), and the forced ids are exactly the
    tokens marked forced (out of the trained mask); the step's forced share is 1."""
    tok = tiny_tok
    fail, stats, _, _ = overflow_collect(overflow_cfg(train_shards, "fail"), tok)
    assert fail.rewards.tolist() == [0.0] * 4 and stats["answer_rate"] == 0.0 and fail.rollouts.forced is None
    cfg = overflow_cfg(train_shards, "close")
    batch, stats, obj, raw = overflow_collect(cfg, tok)
    forced, filler, answer = raw.forced, raw.filler, raw.answer
    assert len(forced) > 1 and not set(forced) & set(filler + answer)  # the forced ids are told apart below
    thought = (filler * 5)[:5]
    want = thought + forced + answer
    r = batch.rollouts
    assert r.completion_ids.tolist() == [want] * 4 and r.completion_mask.tolist() == [[1] * len(want)] * 4
    assert r.forced.tolist() == [[0] * 5 + [1] * len(forced) + [0] * len(answer)] * 4
    assert r.trained_mask.tolist() == [[1] * 5 + [0] * len(forced) + [1] * len(answer)] * 4
    assert r.logprobs.tolist() == [[-1.0] * 5 + [0.0] * len(forced) + [-1.0] * len(answer)] * 4
    assert all(t.endswith("</think>\n\\boxed{ zzzq}") for t in r.texts) and batch.answers == [" zzzq"] * 4
    assert batch.rewards.tolist() == [0.5] * 4 and stats["answer_rate"] == 1.0
    assert stats["entropy"] == 1.0  # the sampler's entropy over sampled tokens only
    # the calls: budget + answer room for all rows, then the answer room on prompt + thought + forced ids, in
    # chunks whose padded prefill is no larger than the first call's (one row at least)
    (first, k1), *chunks = raw.calls
    second = [p for c, _ in chunks for p in c]
    assert k1 == 5 + 8 and {k for _, k in chunks} == {8} and second == [first[i // 2] + thought + forced
                                                                          for i in range(4)]
    limit = len(first) * max(map(len, first))
    assert len(chunks) > 1 and all(len(c) == 1 or len(c) * max(map(len, c)) <= limit for c, _ in chunks)
    s = obj.step_stats()
    assert s["forced_share"] == 1.0 and s["forced_tokens"] == 4 * len(forced)
    assert s["overflow_forward_tokens"] == sum(len(first[i // 2]) + 13 for i in range(4))
    # every thought ran to the budget and was cut there: none ended early, 5 thought tokens each
    assert s["forced_ended_share"] == 0.0 and s["forced_thought_tokens"] == 5.0
    assert s["think_budget"] == 5 and "bucket" not in s  # the step's budget is logged (no curriculum: no bucket)


def test_think_overflow_close_update_masks_exactly_the_forced_ids(tiny_llama, train_shards, tmp_path, monkeypatch):
    """A whole `train` step under close: the batch the update receives marks the forced ids, the loss is
    aggregated (and normalised) over the sampled tokens only, and metrics.jsonl logs the forced share and
    counts the second prefill in forward_tokens."""
    from rpt_train import trainer, update

    seen, masks, norms = [], [], []
    real_update, real_aggregate = trainer.update_policy, update.aggregate
    monkeypatch.setattr(trainer, "update_policy", lambda cfg, m, r, o, batch, **kw: seen.append(batch) or
                        real_update(cfg, m, r, o, batch, **kw))
    monkeypatch.setattr(update, "aggregate", lambda pt, mask, mode, norm: masks.append(mask.clone()) or
                        norms.append(norm) or real_aggregate(pt, mask, mode, norm))
    tok = load_policy(str(tiny_llama), "cpu").tokenizer
    cfg = overflow_cfg(train_shards, "close", model=str(tiny_llama), out=str(tmp_path / "run"), steps=1,
                       loss="dapo", log_samples_every=0, micro_batch_size=8)
    engine = NeverCloses(tok)
    train(cfg, reward_fns=[lambda items: [float(i % 2) for i in range(len(items))]], engine=engine, quiet=True)
    (batch,) = seen
    r = batch.rollouts
    F = len(engine.forced)
    assert r.forced.sum(1).tolist() == [F] * 4 and (r.forced[:, 5:5 + F] == 1).all()
    assert r.completion_ids[:, 5:5 + F].tolist() == [engine.forced] * 4
    (mask,) = masks  # one micro-batch: the update's loss mask is the completion less the forced ids
    torch.testing.assert_close(mask, r.completion_mask - r.forced)
    assert norms == [float(r.trained_mask.sum())]  # dapo: the sampled tokens, not the forced ones
    m = _metrics(tmp_path / "run")[0]
    assert m["forced_share"] == 1.0 and m["forced_tokens"] == 4 * F
    assert m["overflow_forward_tokens"] > 0 and m["forward_tokens"] == (
        m["prompt_tokens"] + m["rollout_tokens"] + m["update_forward_tokens"] + m["objective_forward_tokens"]
        + m["overflow_forward_tokens"] + m.get("scored_tokens", 0))


def test_think_overflow_close_gradient_does_not_depend_on_the_forced_tokens(tiny_llama, train_shards, monkeypatch):
    """The update's weights after one SGD step are the same when the log-probs at the forced ids are changed
    (value and gradient): the forced tokens are not the policy's samples and carry no loss."""
    from rpt_train import update

    policy = load_policy(str(tiny_llama), "cpu")
    tok = policy.tokenizer
    real = update.logprobs
    for kw in ({}, {"beta": 0.1}):  # with a KL term to the reference too
        cfg = overflow_cfg(train_shards, "close", grad_clip=0.0, loss="dapo", **kw)
        batch, _, _, raw = overflow_collect(cfg, tok, rewards=iter([[1.0, 0.0, 0.0, 1.0]]))
        # another thought in every second row, so a group's rows do not cancel in the gradient
        batch.rollouts.completion_ids[1::2, :5] = torch.tensor([i for i in range(100, 120) if i not in raw.forced][:5])
        ref = copy.deepcopy(policy.model) if kw else None
        start = copy.deepcopy(policy.model.state_dict())
        forced = torch.tensor(raw.forced)

        def step(perturb: bool):
            policy.model.load_state_dict(start)

            def logprobs(cfg, model, inputs, *a, **k):
                lp, ent = real(cfg, model, inputs, *a, **k)
                at = torch.isin(inputs[2], forced) & inputs[3].bool()
                return (torch.where(at, 3.0 * lp + 1.0, lp) if perturb else lp), ent

            monkeypatch.setattr(update, "logprobs", logprobs)
            stats = update_policy(cfg, policy.model, ref, torch.optim.SGD(policy.model.parameters(), lr=1.0), batch)
            return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, stats

        (a, sa), (b, sb) = step(False), step(True)
        assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-6, abs=1e-9)
        moved = max(float((a[k] - start[k]).abs().max()) for k in a)
        assert moved > 1e-6
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)


def test_think_overflow_close_evaluates_as_it_trained(tiny_llama, train_shards, tiny_tok, tmp_path):
    """`evaluate` with --think-overflow close forces the same way (budget + answer room, then the answer room after
    the forced text; sampled and greedy completions alike); with fail the thought is never answered. A run's
    in-run eval gets its overflow rule and last budget."""
    from rpt_train.config import EvalConfig
    from rpt_train.evaluate import EVAL_BUCKETS, evaluate, select_positions
    from rpt_train.samples import ShardSet
    from rpt_train.trainer import eval_config

    model = load_policy(str(tiny_llama), device="cpu").model
    shards = ShardSet(str(train_shards))
    results = {}
    for overflow in ("fail", "close"):
        cfg = EvalConfig(shards=str(train_shards), limit=2, samples=2, max_new_tokens=7, template="think",
                         think_overflow=overflow, think_budget=5, answer_room=8)
        chosen = select_positions(shards, tiny_tok, cfg)
        engine = NeverCloses(tiny_tok)
        results[overflow] = (evaluate(model, tiny_tok, engine, cfg, shards, chosen, details=True), engine)
    fail, engine = results["fail"]
    assert fail["all"]["answer_rate"] == 0.0 and {k for _, k in engine.calls} == {7}
    close, engine = results["close"]
    assert close["all"]["answer_rate"] == 1.0
    ks = [k for _, k in engine.calls]  # per chunk: sampled, then greedy, each 13 then its second call(s) of 8
    firsts = [i for i, k in enumerate(ks) if k == 13]
    assert firsts[0] == 0 and set(ks) == {13, 8} and len(firsts) % 2 == 0 and all(ks[i + 1] == 8 for i in firsts)
    for p in close["positions"]:
        assert all(c.endswith("</think>\n\\boxed{ zzzq}") for c in p["completions"] + [p["greedy_completion"]])
    assert all(close[b]["completion_length"] == 5 + len(engine.forced) + len(engine.answer)
               for b in EVAL_BUCKETS if close[b]["n"])
    run = TrainConfig(shards=str(train_shards), template="think", think_budget=8, think_budget_final=4,
                      think_decay_steps=2, steps=3, answer_room=2, think_overflow="close", eval_every=1)
    e = eval_config(run)
    assert (e.think_overflow, e.think_budget, e.answer_room, e.think_close) == ("close", 4, 2, run.think_close)


def test_think_overflow_options_and_plan(train_shards):
    """close needs a budget and the rpt objective, --think-close must start with </think>; the memory plan (and
    dr_grpo's constant) holds the budget + the forced text + the answer room."""
    from rpt_common.errors import UserError
    from rpt_train.config import EvalConfig, load_config

    for kw, msg in (({"think_budget": 0}, "needs --think-budget"),
                    ({"objective": "rlp", "template": "v0"}, "needs --objective rpt"),
                    ({"think_close": "\\boxed{"}, "must start with </think>"),
                    ({"think_overflow": "wait"}, "fail or close")):
        with pytest.raises(UserError, match=msg):
            load_config(TrainConfig, None, {"shards": str(train_shards), "template": "think", "think_budget": 8,
                                            "think_overflow": "close", **kw})
    for kw, msg in (({}, "needs --think-budget"), ({"think_budget": 4, "think_close": "x"}, "must start with")):
        with pytest.raises(UserError, match=msg):
            load_config(EvalConfig, None, {"shards": str(train_shards), "think_overflow": "close", **kw})
    assert load_config(TrainConfig, None, {"shards": str(train_shards), "template": "think", "think_budget": 8,
                                           "think_overflow": "close"}).think_overflow == "close"
    cfg = TrainConfig(shards=str(train_shards), template="think", think_budget=32, think_budget_final=16,
                      think_decay_steps=4, answer_room=16, think_overflow="close")
    assert objectives.planned_new_tokens(cfg) == 32 + len("</think>\n\\boxed{".encode()) + 16
    assert objectives.planned_new_tokens(dataclasses.replace(cfg, think_overflow="fail")) == 48


class StopsEarly(NeverCloses):
    """The thought is two FILLER tokens and EOS (id 0 of tiny_llama's tokenizer), well within the budget."""

    def generate(self, prompts, params):
        if prompts and prompts[0][-len(self.forced):] != self.forced:
            self.filler = (self.filler * 2)[:2] + [self.tokenizer.eos_token_id]
            params = dataclasses.replace(params, max_new_tokens=3)
        return super().generate(prompts, params)


def test_think_overflow_close_drops_the_eos_of_a_thought_that_stopped_early(tiny_tok, train_shards):
    """A rollout that ended (EOS) before the budget without closing its thought is forced too: its thought
    without the EOS, then the forced ids and the answer."""
    cfg = overflow_cfg(train_shards, "close")
    obj = objectives.Objective(cfg, tiny_tok)
    raw = StopsEarly(tiny_tok)
    engine = obj.engine(raw)
    batch = engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=13))
    thought = raw.filler[:2]
    assert tiny_tok.eos_token_id not in thought + raw.forced + raw.answer
    assert batch.completion_ids.tolist() == [thought + raw.forced + raw.answer] * 2
    assert [p for c, _ in raw.calls[1:] for p in c] == [[5, 6, 7] + thought + raw.forced] * 2
    s = obj.step_stats()
    assert s["forced_ended_share"] == 1.0 and s["forced_thought_tokens"] == 2.0


class EndsAtOnce(NeverCloses):
    """The thought is EOS alone: the policy ends it before writing any (issue 34's rpt-think from step 37)."""

    def generate(self, prompts, params):
        if prompts and prompts[0][-len(self.forced):] != self.forced:
            self.filler = [self.tokenizer.eos_token_id]
            params = dataclasses.replace(params, max_new_tokens=1)
        return super().generate(prompts, params)


def test_think_overflow_close_says_once_when_it_closes_empty_thoughts(tiny_tok, train_shards, capsys):
    """A policy that ends every thought at once gets the forced close after an empty thought: the step's stats
    say so (forced_thought_tokens 0, forced_ended_share 1) and the run warns once, naming what it trains; a
    thought of a few tokens is not warned about."""
    cfg = overflow_cfg(train_shards, "close")
    obj = objectives.Objective(cfg, tiny_tok)
    raw = EndsAtOnce(tiny_tok)
    engine = obj.engine(raw)
    for _ in range(2):
        batch = engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=13))
        assert batch.completion_ids.tolist() == [raw.forced + raw.answer] * 2
        s = obj.step_stats()
        assert s["forced_share"] == 1.0 and s["forced_ended_share"] == 1.0 and s["forced_thought_tokens"] == 0.0
    err = capsys.readouterr().err
    assert err.count("warning: --think-overflow close: 2 of 2 rollouts this step were closed by force after "
                     "thoughts of 0.00 tokens") == 1 and "trains answers, not thinking" in err
    obj = objectives.Objective(cfg, tiny_tok)
    engine = obj.engine(StopsEarly(tiny_tok))  # 2-token thoughts: thinking, however short
    engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=13))
    obj.step_stats()
    assert "warning" not in capsys.readouterr().err


def test_think_overflow_close_around_the_hf_engine(tiny_llama):
    """ForcedClose on HFRollout (a random tiny model never writes </think>): each row is its first call's
    tokens up to the budget, the forced ids, then the second call's answer; sampler log-probs kept for the
    sampled tokens and 0 on the forced ones; the text reads '</think>\\n\\boxed{' after the thought."""
    from rpt_train.overflow import ForcedClose
    from rpt_train.rollout import HFRollout

    policy = load_policy(str(tiny_llama), device="cpu")
    tok = policy.tokenizer
    hf = HFRollout(policy.model, tok, [tok.eos_token_id])
    engine = ForcedClose(hf, tok, "</think>\n\\boxed{", budget=6, answer_room=3)
    prompts = [tok("The quick brown fox")["input_ids"], tok("Let x_n be")["input_ids"]]
    torch.manual_seed(0)
    b = engine.generate(prompts, SamplingParams(n=2, temperature=1.0))
    F = len(engine.ids)
    assert b.forced is not None and b.forced.sum(1).tolist() == [F] * 4
    for r in range(4):
        at = b.forced[r].bool()
        assert b.completion_ids[r][at].tolist() == engine.ids and (b.logprobs[r][at] == 0).all()
        start = int(at.nonzero()[0])
        assert start <= 6 and (b.logprobs[r][b.trained_mask[r].bool()] < 0).all()
        assert "</think>\n\\boxed{" in b.texts[r]
    assert engine.pop_stats()["forced_rows"] == 4


# ---- --think-overflow close: the forced text reads back, closes across the cut, no idle second call ------------
def kind_tokenizer(kind: str, tags: str):
    """A tokenizer of `kind` as tests/test_train_tokenizers.py builds them (Metaspace: byte-fallback tokens in the
    vocabulary, as Llama-2's), `<think>`/`</think>` plain text, added tokens or special ones."""
    from test_train_tokenizers import tokenizer

    tok = copy.deepcopy(tokenizer(kind))
    if tags == "added":
        tok.add_tokens(["<think>", "</think>"])
    elif tags == "special":
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    return tok


class CountingEngine(WritingEngine):
    """WritingEngine recording each call's prompts; a prompt ending with `forced` (a second call) gets `answer`."""

    def __init__(self, tokenizer, text, forced=(), answer=" x}"):
        super().__init__(tokenizer, text)
        self.calls, self.forced, self.answer, self.own = [], list(forced), answer, text

    def generate(self, prompts, params):
        from rpt_train.rollout import empty_batch

        self.calls.append([list(p) for p in prompts])
        if not prompts:
            return empty_batch()
        self.text = self.answer if self.forced and prompts[0][-len(self.forced):] == self.forced else self.own
        return super().generate(prompts, params)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tags", ["text", "added", "special"])
def test_think_overflow_close_refuses_a_forced_text_the_reward_cannot_read_back(kind, tags):
    """Every tokenizer kind: where the forced '</think>\\n\\boxed{' reads back as written (byte-level BPE,
    SentencePiece/Metaspace) ForcedClose is built and a forced row is rewarded on the answer after it; a WordPiece
    decoder gives '< / think > boxed' (or '</think> [UNK] boxed' with an added `</think>`), where no forced row
    could ever have an answer: refused in one sentence naming the decoded text."""
    from rpt_common.errors import UserError
    from rpt_train.overflow import THINK_CLOSE, ForcedClose, forced_ids
    from rpt_train.reward import extract_answer

    tok = kind_tokenizer(kind, tags)
    forced = forced_ids(tok, THINK_CLOSE)
    engine = CountingEngine(tok, " the lazy dog is over the fox", forced=forced)
    if kind == "wordpiece":
        with pytest.raises(UserError, match=r"read back as .*boxed.* in which the reward finds no </think> and answer"):
            ForcedClose(engine, tok, THINK_CLOSE, budget=3, answer_room=4)
        return
    batch = ForcedClose(engine, tok, THINK_CLOSE, budget=3, answer_room=4).generate(
        [forced_ids(tok, "Continue.\n<think>\n")], SamplingParams(n=2))
    assert batch.forced.sum(1).tolist() == [len(forced)] * 2
    assert all("</think>\n\\boxed{" in t and extract_answer(t).strip() == "x" for t in batch.texts)


def test_think_overflow_close_refuses_a_tokenizer_that_never_reads_the_policys_own_close():
    """A tokenizer under which the forced text reads back but a thought's own `</think>` does not (a normalizer
    rewriting it after a word) would force every rollout: refused in one sentence."""
    from tokenizers import normalizers

    from rpt_common.errors import UserError
    from rpt_train.overflow import THINK_CLOSE, ForcedClose

    tok = kind_tokenizer("bytelevel", "text")
    tok.backend_tokenizer.normalizer = normalizers.Replace("is</", "is< /")
    with pytest.raises(UserError, match="policy's own </think> reads back as .*every one would be forced"):
        ForcedClose(CountingEngine(tok, " a"), tok, THINK_CLOSE, budget=3, answer_room=4)


@pytest.mark.parametrize("fmt", ["boxed", "answer_tag"])
def test_think_close_auto_opens_the_answer_format_and_a_mismatched_pair_is_refused(tiny_tok, train_shards, fmt):
    """--think-close auto is '</think>\\n' + --answer-format's opening, so a forced row's answer is read under either
    format (with answer_tag the old default '\\boxed{' gave no answer); an explicit --think-close opening the other
    format is refused in one sentence."""
    from rpt_common.errors import UserError
    from rpt_train.budget import think_close
    from rpt_train.config import EvalConfig, load_config
    from rpt_train.overflow import ForcedClose, forced_ids
    from rpt_train.reward import extract_answer

    base = {"shards": str(train_shards), "template": "think", "think_budget": 8, "think_overflow": "close",
            "answer_format": fmt}
    cfg = load_config(TrainConfig, None, base)
    text = think_close(cfg)
    assert text == {"boxed": "</think>\n\\boxed{", "answer_tag": "</think>\n<answer>"}[fmt]
    closing = {"boxed": " zzzq}", "answer_tag": " zzzq</answer>"}[fmt]
    forced = forced_ids(tiny_tok, text)
    engine = CountingEngine(tiny_tok, " hm hm hm hm", forced=forced, answer=closing)
    batch = ForcedClose(engine, tiny_tok, text, budget=2, answer_room=8, answer_format=fmt).generate(
        [[5, 6, 7]], SamplingParams(n=2))
    assert [extract_answer(t, fmt) for t in batch.texts] == [" zzzq"] * 2
    other = {"boxed": "</think>\n<answer>", "answer_tag": "</think>\n\\boxed{"}[fmt]
    for cls, kw in ((TrainConfig, base), (EvalConfig, {**base, "template": "think"})):
        with pytest.raises(UserError, match=f"opens a .* answer but --answer-format is {fmt}"):
            load_config(cls, None, {**kw, "think_close": other})


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_a_close_tag_cut_by_the_budget_is_the_policys_own_and_no_second_call_is_made(kind, monkeypatch):
    """A multi-token `</think>` cut by the budget (' dog</t' | 'hink>...') was closed by the policy: the row is left
    as generated, not forced; and when no row (on any rank) is forced the second generate call is not made at all.
    When another rank forced a row (its count in the ranks' sum), this rank makes the second call too, with no
    prompt, so collective engines stay paired."""
    from rpt_train import overflow
    from rpt_train.overflow import THINK_CLOSE, ForcedClose, forced_ids

    tok = kind_tokenizer(kind, "text")
    own_text = " dog</think>\n\\boxed{the}"
    own = tok(own_text, add_special_tokens=False)["input_ids"]
    budget = len(tok(" dog", add_special_tokens=False)["input_ids"]) + 2
    prompt = forced_ids(tok, "Continue.\n<think>\n")
    assert "</think>" not in tok.decode(own[:budget]) and len(own) > budget  # the cut is inside </think>
    engine = CountingEngine(tok, own_text, forced=forced_ids(tok, THINK_CLOSE))
    fc = ForcedClose(engine, tok, THINK_CLOSE, budget=budget, answer_room=16)
    batch = fc.generate([prompt], SamplingParams(n=2))
    assert batch.completion_ids.tolist() == [own] * 2 and batch.forced is None
    assert fc.pop_stats()["forced_rows"] == 0 and len(engine.calls) == 1  # no second call
    # another rank forced a row: this one (none forced) makes the second call too, with no prompt
    monkeypatch.setattr(overflow.distributed, "all_sum", lambda values: [v + 1 for v in values])
    engine.calls.clear()
    batch = fc.generate([prompt], SamplingParams(n=2))
    assert engine.calls[1:] == [[]] and batch.completion_ids.tolist() == [own] * 2


def test_dr_grpo_constant_is_the_sampled_bound_under_fail_and_close(tiny_llama, train_shards, monkeypatch):
    """dr_grpo divides by rows x the most tokens a completion samples: the same under fail and close (the forced
    text's byte bound is for the memory plan only; forced ids are not samples)."""
    from rpt_train import update

    policy = load_policy(str(tiny_llama), "cpu")
    batch, _, _, _ = overflow_collect(overflow_cfg(train_shards, "close"), policy.tokenizer,
                                      rewards=iter([[1.0, 0.0, 0.0, 1.0]]))
    seen = []
    real = update.global_normalizer
    monkeypatch.setattr(update, "global_normalizer", lambda mode, masks, new: seen.append(new) or real(mode, masks, new))
    for overflow in ("fail", "close"):
        cfg = overflow_cfg(train_shards, overflow, loss="dr_grpo")
        update_policy(cfg, policy.model, None, torch.optim.SGD(policy.model.parameters(), lr=0.0), batch)
    assert seen == [5 + 8, 5 + 8]
    close = overflow_cfg(train_shards, "close")
    assert objectives.planned_new_tokens(close) == 5 + 8 + len("</think>\n\\boxed{".encode())


def test_the_plan_holds_the_second_call_of_close(tiny_tok):
    """--think-overflow close: the plan's overflow_cache is the second generate call's cache (prompt + budget +
    forced + answer room, in the chunks overflow.py makes), by hand for a tiny config; the peak with close is at
    least the one with fail; and every second call ForcedClose makes stays within the planned rows and tokens."""
    from rpt_train.overflow import THINK_CLOSE, ForcedClose
    from rpt_train.plan import Shapes, overflow_cache, plan_memory

    shapes = Shapes(params=10**6, layers=2, hidden=64, intermediate=128, kv_dim=64, vocab=320, layer_params=10**5)
    cfg = TrainConfig(shards="s", batch_prompts=2, group_size=2, template="think", think_budget=5, answer_room=8,
                      think_overflow="close")
    close = plan_memory(cfg, shapes, device_type="cpu", prompt_tokens=50)
    forced = len(THINK_CLOSE.encode())  # 16: one token a byte at most
    rows = 2 * 2  # every rollout of the rank's 2 contexts forced
    tokens = min(rows * (50 + 5 + forced), 2 * 50) + rows * 8  # chunked to the first call's prefill, + answer room
    assert close.extra["overflow_cache"] == 2 * 2 * 64 * tokens * 4 * 3 // 2 + 6 * rows * 320 * 4
    for kw in ({}, {"rollout_batch_size": 3}, {"think_budget_final": 40, "think_decay_steps": 4}):
        on = plan_memory(dataclasses.replace(cfg, **kw), shapes, device_type="cpu", prompt_tokens=50)
        off = plan_memory(dataclasses.replace(cfg, think_overflow="fail", **kw), shapes, device_type="cpu",
                          prompt_tokens=50)
        assert on.total >= off.total and "overflow_cache" not in off.extra
        assert on.total >= on.terms["weights"] + on.terms["optimizer"] + on.extra["overflow_cache"]
    raw = NeverCloses(tiny_tok)
    prompts = [[5, 6, 7, 8, 9, 10], [8, 9, 11]]
    ForcedClose(raw, tiny_tok, THINK_CLOSE, budget=5, answer_room=8).generate(prompts, SamplingParams(n=2))
    _, planned_rows, planned_tokens = overflow_cache(cfg, shapes, 6, len(prompts), 4, 4)
    seconds = [c for c, new in raw.calls[1:]]
    assert len(seconds) > 1 and sum(map(len, seconds)) == 4  # the forced rows, in more than one chunk
    for chunk in seconds:
        assert len(chunk) <= planned_rows and len(chunk) * (max(map(len, chunk)) + 8) <= planned_tokens


def test_the_second_call_runs_as_many_chunks_as_the_busiest_rank(tiny_tok, monkeypatch):
    """FSDP lockstep: every rank makes as many second calls as the rank with the most chunks (here another rank's
    5), the extra ones with no prompt; the rows come back whole and in order."""
    from rpt_train import overflow
    from rpt_train.overflow import THINK_CLOSE, ForcedClose

    raw = NeverCloses(tiny_tok)
    engine = ForcedClose(raw, tiny_tok, THINK_CLOSE, budget=5, answer_room=8)
    alone = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(n=2))
    mine = len(raw.calls) - 1
    monkeypatch.setattr(overflow.distributed, "all_max", lambda v: max(v, mine + 3))
    raw.calls.clear()
    batch = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(n=2))
    assert len(raw.calls) == 1 + mine + 3 and [c for c, _ in raw.calls[-3:]] == [[]] * 3
    assert batch.completion_ids.tolist() == alone.completion_ids.tolist() and 1 < mine
