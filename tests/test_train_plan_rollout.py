"""The plan's rollout phases against what HFRollout really does: the rows of a generate call (whole groups, one at
least, whatever --rollout-batch-size says) and the prefill asking for the last position's logits only."""
from pathlib import Path

import pytest

from rpt_train.config import TrainConfig
from rpt_train.plan import GIB, Shapes, engine_rows, load_shapes, plan_memory
from rpt_train.policy import eos_ids, load_policy
from rpt_train.rollout import HFRollout, SamplingParams


@pytest.fixture(scope="module")
def policy(tiny_llama):
    return load_policy(str(tiny_llama), device="cpu")


class Recorder:
    """Wraps a model's forward: the keyword arguments and the logits' shape of every call."""

    def __init__(self, model):
        self.model, self.forward, self.calls = model, model.forward, []

    def __enter__(self):
        def forward(*args, **kw):
            out = self.forward(*args, **kw)
            self.calls.append((kw.get("input_ids").shape, kw.get("logits_to_keep"), tuple(out.logits.shape)))
            return out

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        self.model.forward = self.forward


SHAPES = Shapes(params=1000, layer_params=400, layers=2, hidden=8, intermediate=16, kv_dim=4, vocab=32)


@pytest.mark.parametrize("batch_size,group", [(2, 4), (6, 4), (8, 4), (0, 4), (3, 1)])
@pytest.mark.parametrize("packed", [True, False])
def test_the_plan_counts_the_rows_the_engine_decodes(policy, batch_size, group, packed):
    tok, model = policy.tokenizer, policy.model
    prompts = [tok("The quick brown fox")["input_ids"], tok("x = 2 so")["input_ids"], tok("a b")["input_ids"]]
    engine = HFRollout(model, tok, [], batch_size=batch_size, packed_prefill=packed)  # no EOS: full length
    with Recorder(model) as rec:
        engine.generate(prompts, SamplingParams(n=group, max_new_tokens=3))
    decoded = max(shape[0] for shape, _, _ in rec.calls if shape[1] == 1)  # decode steps feed one token a row
    cfg = TrainConfig(shards="x", batch_prompts=len(prompts), group_size=group, rollout_batch_size=batch_size,
                      max_new_tokens=3, device="cpu")
    assert engine_rows(cfg, len(prompts)) == decoded
    plan = plan_memory(cfg, SHAPES, device_type="cpu", prompt_tokens=10)
    assert f"{decoded} rollout rows" in plan.notes[0]
    # the kv_cache term is that many rows of prompt + new tokens (one layer twice) + the sampler's buffers
    assert plan.terms["kv_cache"] == 2 * 2 * 4 * decoded * 13 * 4 * 3 // 2 + 6 * decoded * 32 * 4


def test_every_rollout_forward_asks_for_the_last_positions_logits_only(policy):
    """A prefill over [rows, prompt] must not make [rows, prompt, V] logits (45 GB at 14B, 64 rows x 1152
    tokens): every forward of the engine, prefill (packed or batched) and decode, passes logits_to_keep=1."""
    tok, model = policy.tokenizer, policy.model
    prompts = [tok("The quick brown fox jumps")["input_ids"], tok("x = 2 so")["input_ids"]]
    for packed in (True, False):
        engine = HFRollout(model, tok, eos_ids(policy), packed_prefill=packed)
        with Recorder(model) as rec:
            engine.generate(prompts, SamplingParams(n=2, max_new_tokens=2))
        assert any(shape[1] > 1 for shape, _, _ in rec.calls)  # a prefill was seen
        assert all(keep == 1 and logits[1] == 1 for _, keep, logits in rec.calls), rec.calls


def test_the_14b_plan_on_8_gpus_counts_a_whole_group_below_the_group_size():
    """The user's case: 14B shapes, 8 FSDP ranks: --rollout-batch-size 4 < --group-size 8 decodes 8 rows a call,
    so its KV cache is planned as --rollout-batch-size 8's (it was half of it)."""
    shapes = load_shapes(str(Path(__file__).parent.parent / "bench" / "configs" / "qwen2.5-14b"))
    small, whole = (plan_memory(TrainConfig(shards="x", batch_prompts=256, group_size=8, rollout_batch_size=size,
                                            max_new_tokens=8192), shapes, world_size=8, gather=True)
                    for size in (4, 8))
    assert small.terms["kv_cache"] == whole.terms["kv_cache"] > 13 * GIB
    assert "8 rollout rows" in small.notes[0]

