"""Shared-prefix updates (--share-prefix): one packed row per context with a block mask gives the same log-probs,
entropies and gradients as one row per completion, in float64, for every family the packing allows (tied and
untied, scaled and soft-capped heads, sliding windows, left padding, gradient checkpointing, chunks, temperature);
a family it does not allow falls back to separate rows; and a whole update equals the unshared one."""
import pytest
import torch

from rpt_train import packing
from rpt_train.logprobs import forward_logprobs, forward_logprobs_full
from rpt_train.policy import load_policy

# Gemma-2/3 in float32: their eager attention gives NaN on left-padded rows (the unshared side) in float64
FLOAT32 = {"gemma2", "gemma3"}
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "phi", "granite", "cohere",
            "olmo2", "gpt2", "gpt_neox"]


def groups(vocab: int, seed: int = 0, G: int = 3):
    """Two contexts of 12 tokens (the second left-padded to 9 real ones: longer than the tiny sliding windows),
    G completions each of 1 to 5 tokens, rows group-contiguous as the rollouts give them."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, vocab, (2, 12), generator=g)
    pm = torch.ones(2, 12, dtype=torch.long)
    pm[1, :3] = 0
    comp = torch.randint(1, vocab, (2 * G, 5), generator=g)
    lengths = torch.tensor([5, 2, 3, 5, 1, 4, 2, 3][:2 * G] + [1] * max(0, 2 * G - 8))
    cmask = (torch.arange(5)[None] < lengths[:, None]).long()
    return ctx.repeat_interleave(G, 0), pm.repeat_interleave(G, 0), comp, cmask


def model_of(arch, tmp_path, dtype=None, **extra):
    from tiny import make_model_dir

    tie = arch not in ("qwen2", "phi")  # untied heads too
    model = load_policy(str(make_model_dir(tmp_path / arch, arch=arch, tie=tie, **extra)), device="cpu").model
    return model.to(dtype or (torch.float32 if arch in FLOAT32 else torch.float64))


def run(model, inputs, weight, share: bool, **kw):
    model.zero_grad(set_to_none=True)
    lp, ent = forward_logprobs(model, *inputs, kw.pop("temperature", 0.8), with_entropy=True, share_prefix=share, **kw)
    (lp * weight).sum().backward()
    return lp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol):
    """Values and entropies to `tol`; gradients to 1e-6 of their scale: RMSNorm layers (Llama, Qwen, Gemma, ...)
    compute in float32 even in a float64 model, and the packed row sums a context's gradient over its completions
    before that float32 step, the separate rows after it (GPT-2's LayerNorm gives 1e-15)."""
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        scale = float(b[2][name].abs().max())
        torch.testing.assert_close(a[2][name], b[2][name], rtol=max(tol, 1e-6), atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("arch", FAMILIES)
def test_shared_equals_unshared_for_every_packable_family(arch, tmp_path):
    extra = {"sliding_window": 4} if arch == "mistral" else {}
    model = model_of(arch, tmp_path, **extra)
    assert packing.mask_kind(model) is not None
    inputs = groups(model.config.vocab_size)
    dtype = next(model.parameters()).dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    weight = torch.randn(inputs[2].shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    unshared = run(model, inputs, weight, False, chunk_tokens=4)
    shared = run(model, inputs, weight, True, chunk_tokens=4)
    assert_same(shared, unshared, tol)
    assert (shared[0][inputs[3] == 0] == 0).all() and (shared[0][inputs[3] == 1] != 0).all()
    # and both equal the model's own forward (full [B, C, V] logits) where the completion is real
    with torch.no_grad():
        ref, ref_ent = forward_logprobs_full(model, *inputs, 0.8, with_entropy=True)
    mask = inputs[3].bool()
    torch.testing.assert_close(shared[0][mask], ref[mask], rtol=tol, atol=tol)
    torch.testing.assert_close(shared[1][mask], ref_ent[mask], rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (3, 0.7), (4096, 1.3)])
def test_shared_with_gradient_checkpointing_chunks_and_temperature(chunk, temperature, tiny_qwen2):
    model = load_policy(str(tiny_qwen2), device="cpu").model.double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inputs = groups(model.config.vocab_size, seed=4, G=4)
    weight = torch.randn(inputs[2].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_same(run(model, inputs, weight, True, chunk_tokens=chunk, temperature=temperature),
                run(model, inputs, weight, False, chunk_tokens=chunk, temperature=temperature), 1e-11)


def test_packed_row_layout():
    """Context once, then each completion but its last token, positions restarting at len(context); completion
    token 0 read from the context's last state."""
    ids = torch.tensor([[0, 7, 8], [0, 7, 8]])
    pm = torch.tensor([[0, 1, 1], [0, 1, 1]])
    comp = torch.tensor([[3, 4, 5], [6, 9, 0]])
    cm = torch.tensor([[1, 1, 1], [1, 1, 0]])
    p = packing.pack(ids, pm, comp, cm)
    assert p.ids.tolist() == [[7, 8, 3, 4, 6]]
    assert p.positions.tolist() == [[0, 1, 2, 3, 2]]
    assert p.segment.tolist() == [[0, 0, 1, 1, 2]]
    assert p.source.tolist() == [1, 2, 3, 1, 4] and p.targets.tolist() == [3, 4, 5, 6, 9]
    m = packing.block_mask(p)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]


def test_families_that_cannot_pack_fall_back_to_separate_rows(tmp_path):
    """Falcon-H1's state-space layers would carry one completion into the next: unshared, same values."""
    model = model_of("falcon_h1", tmp_path, dtype=torch.float64)
    assert packing.mask_kind(model) is None
    inputs = groups(model.config.vocab_size)
    weight = torch.ones(inputs[2].shape, dtype=torch.float64)
    assert_same(run(model, inputs, weight, True), run(model, inputs, weight, False), 1e-12)


def test_sharing_pays_for_short_answers_not_for_long_reasoning():
    assert packing.pays(1024, 12, 16, hidden=576, intermediate=1536)
    assert packing.pays(256, 64, 16, hidden=576, intermediate=1536)
    assert not packing.pays(1024, 1024, 8, hidden=2048, intermediate=8192)
    assert not packing.pays(1152, 8192, 8, hidden=576, intermediate=1536)


def batch_of(inputs, rewards, entropy=None):
    from rpt_train.collect import Groups
    from rpt_train.rollout import RolloutBatch

    rollouts = RolloutBatch(prompt_ids=inputs[0], prompt_mask=inputs[1], completion_ids=inputs[2],
                            completion_mask=inputs[3], logprobs=None, texts=["x"] * len(inputs[0]), entropy=entropy)
    return Groups(samples=[None] * 2, rollouts=rollouts, rewards=torch.tensor(rewards), answers=[None] * len(rewards))


def update_with(share: bool, path, batch, **kw):
    import copy

    from rpt_train.config import TrainConfig
    from rpt_train.policy import freeze
    from rpt_train.update import update_policy

    model = load_policy(str(path), device="cpu").model.double()
    ref = freeze(copy.deepcopy(model))
    cfg = TrainConfig(shards="x", group_size=3, max_new_tokens=5, lr=1e-3, beta=0.05, ppo_epochs=2,
                      mini_batch_size=4, micro_batch_size=1, share_prefix=share, **kw)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    stats = update_policy(cfg, model, ref, optimizer, batch)
    return stats, dict(model.named_parameters())


def test_a_whole_update_equals_the_unshared_one(tiny_qwen2, monkeypatch):
    """2 PPO epochs, mini-batches that split a group, a KL reference (its pass shared too), old log-probs: the
    same loss, statistics and weights after the update; the micro-batches counted groups."""
    monkeypatch.setattr(packing, "pays", lambda *a: True)  # these tiny rows would not pay: share them anyway
    inputs = groups(320, seed=9)
    batch = batch_of(inputs, [1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    a, wa = update_with(True, tiny_qwen2, batch)
    b, wb = update_with(False, tiny_qwen2, batch)
    assert a.pop("shared_prefix") is True and b.pop("shared_prefix") is False
    # compute accounting: a shared prefix runs each context once per group, so fewer tokens go through the model
    assert 0 < a.pop("update_forward_tokens") < b.pop("update_forward_tokens")
    assert 0 < a.pop("backward_tokens") < b.pop("backward_tokens")
    assert a.keys() == b.keys() and a["updates"] == 2 * 2
    for k in a:
        assert a[k] == b[k] if not isinstance(a[k], float) else a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-8, msg=name)  # AdamW steps of 1e-3


def test_an_update_with_forced_tokens_equals_the_unshared_one(tiny_qwen2, monkeypatch):
    """--think-overflow close: rows with forced tokens (in the packed row, out of the loss) give the same update
    shared as unshared, and not the update of the same rows without the forced marks (they carry no loss)."""
    monkeypatch.setattr(packing, "pays", lambda *a: True)
    inputs = groups(320, seed=9)
    forced = torch.zeros_like(inputs[3])
    forced[0, 1:3] = forced[3, 1:3] = forced[5, 2] = 1  # inside the completions (lengths 5, 5, 4)
    assert (inputs[3][forced.bool()] == 1).all()
    batch = batch_of(inputs, [1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    batch.rollouts.forced = forced
    a, wa = update_with(True, tiny_qwen2, batch)
    b, wb = update_with(False, tiny_qwen2, batch)
    batch.rollouts.forced = None
    c, wc = update_with(True, tiny_qwen2, batch)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["clip_ratio"] == pytest.approx(b["clip_ratio"])
    for name in wa:  # AdamW steps of 1e-3: 1e-6 is a thousandth of one (float32 RMSNorm noise on tiny gradients)
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)
    assert max(float((wa[n] - wc[n]).abs().max()) for n in wa) > 1e-4
    # compute accounting: forced tokens run through the forward and backward passes like the others
    assert a["backward_tokens"] == c["backward_tokens"]


def test_no_forward_runs_to_log_entropy(tiny_qwen2):
    """Zero-advantage rows and steps without an update run no forward; the entropy is the sampler's."""
    from rpt_train.config import TrainConfig
    from rpt_train.update import no_update, update_policy

    inputs = groups(320, seed=2)
    batch = batch_of(inputs, [1.0, 0.0, 0.0, 1.0, 1.0, 1.0], entropy=torch.rand(inputs[2].shape) * inputs[3])
    model = load_policy(str(tiny_qwen2), device="cpu").model.double()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    cfg = TrainConfig(shards="x", group_size=3, max_new_tokens=5, micro_batch_size=4)
    stats = update_policy(cfg, model, None, torch.optim.AdamW(model.parameters()), batch)
    assert len(calls) == 1 and stats["updates"] == 1  # one packed row: the first group; the second is idle
    assert "entropy" not in stats  # collect.rollout_stats has it from the rollouts
    assert "entropy" not in no_update(cfg, None, [batch])  # no model needed at all


def test_rollout_entropy_is_the_policy_entropy_of_the_update(tiny_llama):
    """HFRollout's per-token entropy (the metric, with no forward of its own) equals the training pass's."""
    from rpt_train.rollout import HFRollout, SamplingParams

    policy = load_policy(str(tiny_llama), device="cpu")
    torch.manual_seed(0)
    prompts = [policy.tokenizer("The quick brown fox")["input_ids"], policy.tokenizer("Let x_n be")["input_ids"]]
    b = HFRollout(policy.model, policy.tokenizer, [policy.tokenizer.eos_token_id]).generate(
        prompts, SamplingParams(n=3, max_new_tokens=6, temperature=0.7))
    with torch.no_grad():
        _, ent = forward_logprobs(policy.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask,
                                  0.7, with_entropy=True, share_prefix=True)
    assert b.entropy.shape == b.completion_mask.shape and (b.entropy[b.completion_mask == 0] == 0).all()
    torch.testing.assert_close(b.entropy, ent, rtol=1e-4, atol=1e-4)


def test_the_plan_models_the_shared_path():
    """A micro-batch of groups: packed rows of context + G completions (and their block mask) where sharing pays,
    separate rows where it does not (long completions)."""
    from rpt_train.config import TrainConfig
    from rpt_train.plan import TEMPLATE_TOKENS, Shapes, activation_bytes, logprob_bytes, plan_memory

    shapes = Shapes(params=10 ** 9, layer_params=10 ** 7, layers=24, hidden=2048, intermediate=8192, kv_dim=256,
                    vocab=150000)
    kw = dict(shards="x", group_size=16, micro_batch_size=2, max_context_tokens=1024, device="cpu")
    on, off = (plan_memory(TrainConfig(**kw, max_new_tokens=12, share_prefix=s), shapes, device_type="cpu")
               for s in (True, False))
    T = 1024 + TEMPLATE_TOKENS + 16 * 12
    element = 4  # --dtype float32 on CPU
    assert off.terms["activations"] == activation_bytes(shapes, 2, 1024 + TEMPLATE_TOKENS + 12, element, False)
    assert on.terms["activations"] == activation_bytes(shapes, 2, T, element, False) + 2 * T * T
    assert on.terms["logprobs"] == logprob_bytes(150000, 2 * 16 * 12, 1024) and "shared prefix" in on.notes[0]
    long_on, long_off = (plan_memory(TrainConfig(**kw, max_new_tokens=8192, share_prefix=s), shapes, device_type="cpu")
                         for s in (True, False))
    assert long_on.terms == long_off.terms


def test_the_power_experiment_uses_the_shared_path():
    from pathlib import Path

    from rpt_train.config import TrainConfig
    from rpt_train.experiment import Experiment, load_spec

    spec = load_spec(str(Path(__file__).parents[1] / "pipelines" / "experiments" / "smollm2-champ-power.yaml"))
    assert all(Experiment(spec).train_config(arm, check_only=True).share_prefix for arm in spec.arms.values())
    assert TrainConfig(shards="x").share_prefix  # the default
