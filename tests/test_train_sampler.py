"""--sampler learnability (score, choice, refusal), contexts.jsonl (what each step rolled out) and --exclude-docs."""
import json

import numpy as np
import pytest
import torch
from shard_fixtures import length_reward, train_shards, tiny_tok  # noqa: F401
from test_train_loop import ScriptedEngine

from rpt_common.errors import UserError
from rpt_train.config import TrainConfig, load_config
from rpt_train.policy import load_policy
from rpt_train.rollout import SamplingParams
from rpt_train.sampler import LearnabilityScorer, check_sampler, informative
from rpt_train.samples import TrainSamples
from rpt_train.templates import PromptBuilder
from rpt_train.trainer import collect, train


def test_informative_is_the_chance_that_a_group_disagrees():
    assert informative(np.array([0.0, 1.0]), 8).tolist() == [0.0, 0.0]
    assert informative(np.array([0.5]), 2)[0] == pytest.approx(0.5)
    assert informative(np.array([0.1]), 16)[0] == pytest.approx(1 - 0.1 ** 16 - 0.9 ** 16)


def test_scorer_sums_the_probability_of_label_prefix_tokens_under_left_padding(tiny_llama, tiny_tok):
    model = load_policy(str(tiny_llama), device="cpu").model
    scorer = LearnabilityScorer(model, tiny_tok, batch_size=3)
    prompts = [tiny_tok(t)["input_ids"] for t in ("the cat sat on", "a", "one two three four five six seven")]
    labels = [" the mat", "bc", " eight"]
    got = scorer.probabilities(prompts, labels)
    vocab = tiny_tok.batch_decode([[i] for i in range(len(tiny_tok))])
    for p, label, g in zip(prompts, labels, got):
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(), -1)
        hit = [i for i, s in enumerate(vocab) if s and "\ufffd" not in s and label.startswith(s)]
        assert hit and g == pytest.approx(float(probs[hit].sum()), rel=1e-4, abs=1e-7)


def test_the_scorers_forward_builds_no_kv_cache_and_keeps_one_positions_logits(tiny_llama, tiny_tok):
    """The scorer reads one position of each prompt: its forward must not build a KV cache (a model's default,
    use_cache=True, kept every layer's keys and values of the whole chunk: ~94 GiB at 14B for --rollout-batch-size
    256 prompts x 1024 tokens, which the memory plan did not count) nor logits of every position."""
    model = load_policy(str(tiny_llama), device="cpu").model
    forward, calls = model.forward, []

    def recorded(*args, **kw):
        out = forward(*args, **kw)
        calls.append((kw.get("use_cache"), kw.get("logits_to_keep"), tuple(out.logits.shape),
                      getattr(out, "past_key_values", None)))
        return out

    model.forward = recorded
    try:
        prompts = [tiny_tok(t)["input_ids"] for t in ("the cat sat on", "a", "one two three four five six seven")]
        LearnabilityScorer(model, tiny_tok, batch_size=2).probabilities(prompts, [" the", "b", " eight"])
    finally:
        model.forward = forward
    assert [(c[0], c[1], c[2][:2]) for c in calls] == [(False, 1, (2, 1)), (False, 1, (1, 1))], calls
    assert all(c[3] is None for c in calls), "a forward returned a KV cache"


class FixedScorer:
    """p per context, keyed by the context's text."""

    def __init__(self, p_of):
        self.p_of, self.calls = p_of, []

    def probabilities(self, prompts, labels):
        self.calls.append(len(prompts))
        return np.array([self.p_of(len(p)) for p in prompts])


def test_learnability_rolls_out_the_most_informative_contexts_of_the_pool(train_shards, tiny_tok):
    cfg = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=3, group_size=4, sampler="learnability",
                      sampler_pool=4, response_prefix="\\boxed{", max_sampling_rounds=1)
    prompts = PromptBuilder(tiny_tok, response_prefix="\\boxed{")
    pool = TrainSamples(cfg, tiny_tok).next_batch(12)  # what the sampler draws first: the same seeded stream
    lengths = [len(prompts.ids(s.context)) for s in pool]
    ranked = sorted(set(lengths))
    p_of = {n: (0.5 if i % 3 == 0 else 0.0) for i, n in enumerate(ranked)}  # some contexts learnable, most not
    scorer, engine = FixedScorer(p_of.get), ScriptedEngine(tiny_tok)
    batch, made, stats = collect(cfg, TrainSamples(cfg, tiny_tok), prompts, engine, lambda items: [0.0] * len(items),
                                 SamplingParams(n=4), scorer)
    assert scorer.calls == [12] and engine.calls == [3]
    score = informative(np.array([p_of[n] for n in lengths]), 4)
    expected = sorted(np.argsort(-score, kind="stable")[:3].tolist())
    assert [s.key for s in made[0].samples] == [pool[i].key for i in expected]
    assert stats["contexts"] == [pool[i].index for i in expected] and stats["contexts_scored"] == 12
    assert stats["sampler_p_chosen"] == pytest.approx(np.mean([p_of[lengths[i]] for i in expected]))


def test_learnability_needs_the_answer_right_after_the_prompt(train_shards, tmp_path):
    cfg = TrainConfig(shards=str(train_shards), sampler="learnability", out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="--response-prefix"):
        check_sampler(cfg)
    with pytest.raises(UserError, match="--response-prefix"):
        train(cfg, quiet=True)
    check_sampler(TrainConfig(shards=str(train_shards), sampler="learnability", response_prefix="\\boxed{"))
    with pytest.raises(UserError, match="--sampler must be"):
        load_config(TrainConfig, None, {"shards": str(train_shards), "sampler": "entropy"})


def test_contexts_jsonl_rebuilds_each_steps_samples(tiny_llama, train_shards, tiny_tok, tmp_path):
    cfg = TrainConfig(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / "run"), steps=2,
                      bucket="all", batch_prompts=2, group_size=2, max_new_tokens=4, log_samples_every=1,
                      sampler="learnability", sampler_pool=3, response_prefix="\\boxed{", max_sampling_rounds=2)
    out = train(cfg, reward_fns=[length_reward], quiet=True)
    steps = [json.loads(line) for line in open(out / "contexts.jsonl")]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [s["step"] for s in steps] == [1, 2]
    assert [len(s["contexts"]) for s in steps] == [m["contexts_drawn"] for m in metrics]
    assert all(m["contexts_scored"] == 3 * m["contexts_drawn"] and 0 <= m["sampler_p_chosen"] <= 1 for m in metrics)
    logged = [json.loads(line) for line in open(out / "samples.jsonl")]
    data = TrainSamples(cfg, tiny_tok)
    for s in steps:
        keys = [x.key for x in data.build.many(s["contexts"])]
        assert s["keys"] == keys  # the positions' keys, logged beside their indices (same_contexts checks them)
        rows = [r["key"] for r in logged if r["step"] == s["step"]]  # the step's first rollouts, G = 2 per context
        assert rows and rows[::2] == keys[:len(rows) // 2]


def test_exclude_docs_are_never_drawn(train_shards, tiny_tok, tmp_path):
    cfg = TrainConfig(shards=str(train_shards), bucket="all")
    everything = TrainSamples(cfg, tiny_tok)
    docs = sorted({s.doc_id for s in everything.next_batch(len(everything))})
    (tmp_path / "skip.txt").write_text(f"{docs[0]}\n\n{docs[1]}\n")
    cfg = TrainConfig(shards=str(train_shards), bucket="all", exclude_docs=str(tmp_path / "skip.txt"))
    rest = TrainSamples(cfg, tiny_tok)
    drawn = {s.doc_id for s in rest.next_batch(3 * len(rest))}
    assert 0 < len(rest) < len(everything) and drawn == set(docs[2:])
    with pytest.raises(UserError, match="--exclude-docs"):
        TrainSamples(TrainConfig(shards=str(train_shards), exclude_docs=str(tmp_path / "missing.txt")), tiny_tok)


def test_each_rank_scores_its_stripe_of_the_pool(monkeypatch):
    """Under torchrun the pool's forwards are divided: rank r scores contexts r, r+W, ... (padded to as many rows
    as every other rank, so the sharded forwards stay in lockstep) and the ranks' p are gathered in pool order."""
    from rpt_train import distributed, sampler

    world, pool = 3, 7
    true_p = np.linspace(0.05, 0.95, pool)

    class Scorer:
        def __init__(self):
            self.rows = []

        def probabilities(self, prompts, labels):
            self.rows.append([q[0] for q in prompts])
            return np.array([true_p[q[0]] for q in prompts])

    scorers = {r: Scorer() for r in range(world)}
    stripes = {}
    for rank in range(world):  # each rank's call, with the others' stripes answered as they would be
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        monkeypatch.setattr(distributed, "all_gather_objects",
                            lambda obj, r=rank: [obj if q == r else true_p[q::world].tolist() for q in range(world)])
        stripes[rank] = sampler.pool_probabilities(scorers[rank], [[i] for i in range(pool)], ["x"] * pool)
    for rank in range(world):
        np.testing.assert_allclose(stripes[rank], true_p)
        assert len(scorers[rank].rows) == 1 and len(scorers[rank].rows[0]) == 3  # ceil(7 / 3) rows, not 7
        assert scorers[rank].rows[0][:len(range(rank, pool, world))] == list(range(rank, pool, world))
