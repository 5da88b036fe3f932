"""The loop: dynamic sampling refill, gradient accumulation, resume equality, checkpoints, eval bucket accounting."""
import hashlib
import json

import pytest
import torch
from shard_fixtures import length_reward, train_shards, tiny_tok  # noqa: F401

from rpt_common.errors import UserError
from rpt_train.checkpoint import latest_checkpoint, list_checkpoints
from rpt_train.config import EvalConfig, TrainConfig
from rpt_train.evaluate import EVAL_BUCKETS, evaluate, select_positions
from rpt_train.policy import eos_ids, load_policy
from rpt_train.reward import rpt_reward
from rpt_train.rollout import HFRollout, RolloutBatch, SamplingParams
from rpt_train.samples import ShardSet, TrainSamples
from rpt_train.templates import PromptBuilder
from rpt_train.trainer import collect, train, update_policy

TIMING = ("seconds", "rollout_seconds", "rollout_tokens_per_s")


class ScriptedEngine:
    """Completions 'c'; rewards come from the scripted reward function."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        n = len(prompts) * params.n
        ones = torch.ones(n, 2, dtype=torch.long)
        return RolloutBatch(prompt_ids=ones, prompt_mask=ones, completion_ids=ones * 5, completion_mask=ones,
                            logprobs=None, texts=["c"] * n)

    def sync(self, model):
        pass


def scripted(rounds):
    rounds = list(rounds)
    return lambda items: [float(x) for x in rounds.pop(0)]


def test_dynamic_sampling_refills_with_informative_groups(train_shards, tiny_tok):
    cfg = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=4, group_size=2, max_sampling_rounds=5)
    engine = ScriptedEngine(tiny_tok)
    # round 1 keeps 1 of 4 groups; the refill for 3 draws 3 / (1/4) = 12, capped at a round's 4 contexts, and keeps
    # 2; the refill for the last one draws 1 / (3/8) -> 3 contexts, 2 keep: the first counts, the other is dropped
    reward = scripted([[0, 0, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    batch, made, stats = collect(cfg, TrainSamples(cfg, tiny_tok), PromptBuilder(tiny_tok), engine, reward,
                                 SamplingParams(n=2))
    assert engine.calls == [4, 4, 3]
    assert batch.rewards.tolist() == [1, 0, 0, 1, 1, 0, 0, 1]
    assert len(batch.samples) == 4 and batch.rollouts.completion_ids.shape[0] == 8
    assert batch.samples[0] is made[0].samples[1] and batch.samples[3] is made[2].samples[0]
    assert stats["sampling_rounds"] == 3 and stats["groups_kept"] == 4
    assert stats["frac_reward_zero_std"] == pytest.approx(6 / 11)
    assert stats["reward"] == pytest.approx(9 / 22)


def test_a_refill_oversamples_by_the_observed_keep_rate():
    from rpt_train.collect import refill_size

    assert refill_size(need=2, kept=6, drawn=8, batch=8) == 3  # 2 / (6/8) -> 3, not a full round of 8
    assert refill_size(need=1, kept=7, drawn=8, batch=8) == 2
    assert refill_size(need=3, kept=1, drawn=8, batch=8) == 8  # 24 wanted, at most a round's contexts
    assert refill_size(need=3, kept=0, drawn=8, batch=8) == 8  # nothing kept yet: a full round
    assert refill_size(need=4, kept=8, drawn=8, batch=8) == 4  # never fewer than the missing groups


def test_dynamic_sampling_is_bounded_and_optional(train_shards, tiny_tok):
    cfg = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=3, group_size=2, max_sampling_rounds=2)
    engine = ScriptedEngine(tiny_tok)
    batch, _, stats = collect(cfg, TrainSamples(cfg, tiny_tok), PromptBuilder(tiny_tok), engine,
                              lambda items: [0.0] * len(items), SamplingParams(n=2))
    assert engine.calls == [3, 3] and batch is None
    assert stats["frac_reward_zero_std"] == 1.0 and stats["groups_kept"] == 0
    cfg.dynamic_sampling = False
    engine = ScriptedEngine(tiny_tok)
    batch, _, stats = collect(cfg, TrainSamples(cfg, tiny_tok), PromptBuilder(tiny_tok), engine,
                              lambda items: [0.0] * len(items), SamplingParams(n=2))
    assert engine.calls == [3] and len(batch.samples) == 3 and stats["frac_reward_zero_std"] == 1.0


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_llama, train_shards, tiny_tok, loss):
    cfg = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=3, group_size=2, max_new_tokens=6,
                      temperature=0.9, grad_clip=0.0, loss=loss, dynamic_sampling=False)
    policy = load_policy(str(tiny_llama), device="cpu")
    torch.manual_seed(0)
    batch, _, _ = collect(cfg, TrainSamples(cfg, tiny_tok), PromptBuilder(tiny_tok),
                          HFRollout(policy.model, policy.tokenizer, eos_ids(policy)), length_reward,
                          SamplingParams(n=2, max_new_tokens=6, temperature=0.9))
    batch.rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0, 0.0])  # group 0: advantage 0, skips the backward
    deltas = []
    # micro-batches of 1 and 6; then every row through the backward (a KL term of weight 1e-30 forces it)
    for micro, beta in ((1, 0.0), (6, 0.0), (6, 1e-30)):
        model = load_policy(str(tiny_llama), device="cpu").model
        ref = load_policy(str(tiny_llama), device="cpu").model if beta else None
        before = [p.detach().clone() for p in model.parameters()]
        cfg.micro_batch_size, cfg.beta = micro, beta
        update_policy(cfg, model, ref, torch.optim.SGD(model.parameters(), lr=1.0), batch)
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    assert deltas[0].abs().max() > 0
    assert torch.allclose(deltas[0], deltas[1], atol=1e-6)
    assert torch.allclose(deltas[1], deltas[2], atol=1e-6)


def _train(shards, out, steps, **kw):
    cfg = TrainConfig(shards=str(shards), model=kw.pop("model"), out=str(out), steps=steps, bucket="all",
                      batch_prompts=2, group_size=3, max_new_tokens=6, lr=1e-2, warmup_steps=1, beta=0.05,
                      ppo_epochs=2, micro_batch_size=4, save_every=1, keep_checkpoints=2, log_samples_every=1,
                      heldout_fraction=0.3, eval_every=2, eval_limit=2, **kw)
    return train(cfg, reward_fns=[length_reward], quiet=True)


def _metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(out / "metrics.jsonl")]


def test_resume_equals_uninterrupted_run(tiny_llama, train_shards, tmp_path):
    full = _train(train_shards, tmp_path / "full", 3, model=str(tiny_llama))
    part = _train(train_shards, tmp_path / "part", 1, model=str(tiny_llama))
    with open(part / "metrics.jsonl", "a") as f:  # a step logged after the last checkpoint, then a crash
        f.write(json.dumps({"step": 2, "loss": 123.0}) + "\n")
    with pytest.raises(UserError, match="already holds a run"):
        _train(train_shards, part, 3, model=str(tiny_llama))
    _train(train_shards, part, 3, model=str(tiny_llama), resume=True)
    a, b = _metrics(full), _metrics(part)
    assert [m["step"] for m in a] == [1, 2, 3] and a == b
    assert {"loss", "lr", "reward", "reward_std", "frac_reward_zero_std", "answer_rate", "completion_length",
            "clip_ratio", "entropy", "kl", "eval/hard/ntr_accuracy"} <= set(a[1])
    assert [s for s, _ in list_checkpoints(full)] == [2, 3]
    samples = [json.loads(line) for line in open(full / "samples.jsonl")]
    assert {"prompt_tail", "completion", "answer", "label", "reward"} <= set(samples[0])
    assert (full / "eval" / "step-000002.json").exists()


def test_resume_with_beta_keeps_the_original_kl_reference(tiny_llama, train_shards, tmp_path, monkeypatch):
    """--beta > 0: a resume takes its reference from the saved base model, and a --model that resolves to another
    model (here the run directory itself, i.e. its latest checkpoint) is refused in one sentence."""
    from rpt_train import distributed

    out = _train(train_shards, tmp_path / "run", 1, model=str(tiny_llama))
    state = torch.load(latest_checkpoint(out) / "trainer_state.pt", weights_only=False)
    assert state["base_model"] == str(tiny_llama.resolve())
    with pytest.raises(UserError, match=r"is not the base model .* KL reference \(--beta 0.05\)"):
        _train(train_shards, out, 2, model=str(out), resume=True)
    loaded, load = [], distributed.load_sharded_policy
    monkeypatch.setattr(distributed, "load_sharded_policy", lambda spec, *a, **k: loaded.append(spec) or load(spec, *a, **k))
    _train(train_shards, out, 2, model=str(tiny_llama), resume=True)
    assert loaded == [str(latest_checkpoint(out).parent / "step-000001"), str(tiny_llama.resolve())]  # policy, ref
    assert [m["step"] for m in _metrics(out)] == [1, 2]


def _small(shards, model, out, steps, **kw):
    cfg = TrainConfig(shards=str(shards), model=str(model), out=str(out), steps=steps, bucket="all", batch_prompts=2,
                      group_size=3, max_new_tokens=4, lr=1e-2, save_every=1, log_samples_every=0,
                      dynamic_sampling=False, **kw)
    return train(cfg, reward_fns=[length_reward], quiet=True)


def test_resume_releases_the_loaded_trainer_state(tiny_llama, train_shards, tmp_path, monkeypatch):
    """The loaded trainer_state.pt (rank 0: the full float32 AdamW state, rlp's EMA copy; 2-3x the model in host
    memory) is dropped once loaded: nothing holds it during the resumed steps (and their checkpoint saves)."""
    import gc
    import weakref

    from rpt_train import trainer

    _small(train_shards, tiny_llama, tmp_path / "run", 1)

    class Marker:
        pass

    refs, alive, load, collect_ = [], [], trainer.load_trainer_state, trainer.collect

    def marked(path):
        state = load(path)
        marker = state["_marker"] = Marker()
        refs.append(weakref.ref(marker))
        return state

    def collect(*a, **k):
        gc.collect()
        alive.append(refs[0]() is not None)
        return collect_(*a, **k)

    monkeypatch.setattr(trainer, "load_trainer_state", marked)
    monkeypatch.setattr(trainer, "collect", collect)
    _small(train_shards, tiny_llama, tmp_path / "run", 3, resume=True)
    assert alive == [False, False]  # steps 2 and 3: the dict the checkpoint was loaded into is gone


def test_resume_with_gradient_checkpointing_and_other_micro_batches_gives_the_same_next_step(tiny_llama, train_shards,
                                                                                             tmp_path):
    """--gradient-checkpointing and --micro-batch-size change how, not what, an update computes: a run stopped at a
    checkpoint (the situation: out of memory) resumes with them changed, and its next step equals the uninterrupted
    run's (to float rounding: other micro-batches sum the same terms in another order)."""
    from safetensors.torch import load_file

    kw = dict(micro_batch_size=4, ppo_epochs=2, beta=0.05)  # 6 rows: micro-batches of 4 + 2, then 1 each
    full = _small(train_shards, tiny_llama, tmp_path / "full", 2, **kw)
    part = _small(train_shards, tiny_llama, tmp_path / "part", 1, **kw)
    _small(train_shards, tiny_llama, part, 2, resume=True, **kw | dict(gradient_checkpointing=True, micro_batch_size=1))
    a, b = _metrics(full), _metrics(part)
    assert a[0] == b[0] and a[1]["updates"] == b[1]["updates"] == 2
    numbers = {k for k, v in a[1].items() if isinstance(v, float)}
    assert {k: v for k, v in b[1].items() if k not in numbers} == {k: v for k, v in a[1].items() if k not in numbers}
    assert {k: b[1][k] for k in numbers} == pytest.approx({k: a[1][k] for k in numbers}, rel=1e-4, abs=1e-7)
    assert a[1]["loss"] != 0 and a[1]["grad_norm"] > 0
    wa, wb = (load_file(latest_checkpoint(o) / "model.safetensors") for o in (full, part))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000005").mkdir(parents=True)  # no trainer_state.pt: not complete
    (root / ".tmp-step-000009").mkdir()
    (root / "step-000003").mkdir()
    (root / "step-000003" / "trainer_state.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == root / "step-000003"


class OracleEngine:
    """Answers from a lookup of prompt -> sample: correct on the first try for 'even' keys, else on the second."""

    def __init__(self, tokenizer, samples):
        prompts = PromptBuilder(tokenizer)
        self.tokenizer, self.by_prompt = tokenizer, {tuple(prompts.ids(s.context)): s for s in samples}

    def generate(self, prompts, params):
        texts = []
        for p in prompts:
            s = self.by_prompt[tuple(p)]
            first = f"\\boxed{{{s.label_tokens[0]}}}" if even(s) else "no idea"
            texts += [first] + [f"\\boxed{{{''.join(s.label_tokens)}}}"] * (params.n - 1)
        ones = torch.ones(len(texts), 1, dtype=torch.long)
        return RolloutBatch(prompt_ids=ones, prompt_mask=ones, completion_ids=ones, completion_mask=ones, logprobs=None,
                            texts=texts)


def even(s):
    return hashlib.md5(s.key.encode()).digest()[0] % 2 == 0


def test_eval_bucket_accounting(tiny_llama, train_shards, tiny_tok):
    cfg = EvalConfig(shards=str(train_shards), limit=6, samples=2, max_new_tokens=4)
    shards = ShardSet(str(train_shards))
    chosen = select_positions(shards, tiny_tok, cfg)
    for b, th in zip(("easy", "medium", "hard"), cfg.bucket_thresholds):
        assert len(chosen[b]) == 6 and all(s.entropy > th for s in chosen[b])
    assert len(chosen["all"]) == 6
    assert chosen == select_positions(shards, tiny_tok, cfg)  # seeded
    unique = {s.key: s for b in EVAL_BUCKETS for s in chosen[b]}.values()
    model = load_policy(str(tiny_llama), device="cpu").model
    result = evaluate(model, tiny_tok, OracleEngine(tiny_tok, unique), cfg, shards, chosen)
    for b in EVAL_BUCKETS:
        k = sum(even(s) for s in chosen[b])
        r = result[b]
        assert r["n"] == 6
        assert r["ntr_accuracy"] == pytest.approx(k / 6)
        assert r["ntr_pass_at_k"] == 1.0
        assert r["answer_rate"] == pytest.approx((6 * 2 - (6 - k)) / 12)
        assert 0.0 <= r["ntp_accuracy"] <= 1.0
    assert result["meta"]["k"] == 2


def test_eval_reports_empty_buckets(train_shards, tiny_tok):
    cfg = EvalConfig(shards=str(train_shards), limit=3, bucket_thresholds=[0.5, 1.0, 99.0])
    chosen = select_positions(ShardSet(str(train_shards)), tiny_tok, cfg)
    assert chosen["hard"] == [] and len(chosen["medium"]) == 3


def test_response_prefix_is_prompted_and_put_back_before_the_answer_is_extracted(train_shards, tiny_tok):
    from rpt_train.trainer import rollout_groups

    prompts = PromptBuilder(tiny_tok, "answer-only", "off", response_prefix="\\boxed{")
    assert prompts.text("abc").endswith("### Context\nabc\\boxed{")
    assert prompts.ids("abc") == tiny_tok(prompts.text("abc"))["input_ids"]
    cfg = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=2, group_size=2)
    samples = TrainSamples(cfg, tiny_tok).next_batch(2)

    class Answers(ScriptedEngine):  # completions: the first label token then "}", or an unclosed box
        def generate(self, prompts_, params):
            batch = super().generate(prompts_, params)
            batch.texts = [t for s in samples for t in ("".join(s.label_tokens[:1]) + "} more", "x")]
            return batch

    groups = rollout_groups(samples, prompts, Answers(tiny_tok), rpt_reward(), SamplingParams(n=2), "boxed")
    assert groups.answers == [t for s in samples for t in ("".join(s.label_tokens[:1]), None)]
    assert groups.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
