"""The sft arm (rpt_train/sft.py) resumes as `rpt-train run --resume` does: with the options it ran with."""
import pytest
from shard_fixtures import train_shards  # noqa: F401

import rpt_train.checkpoint as checkpoint
from rpt_common.errors import UserError
from rpt_train.config import TrainConfig


def killed_after(step: int, monkeypatch):
    """save_checkpoint that stops the process (SystemExit) right after saving `step`."""
    real = checkpoint.save_checkpoint

    def save(out, at, *a, **kw):
        path = real(out, at, *a, **kw)
        if at == step:
            raise SystemExit(f"killed after step {step}")
        return path
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)


def test_sft_resume_or_rerun_with_other_options_is_refused(tiny_llama, train_shards, tmp_path, monkeypatch):
    from rpt_train.sft import next_contexts, read_jsonl, sft_train

    base = dict(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / "arm"), bucket="all",
                micro_batch_size=2, template="answer-only", chat_template="off", response_prefix="\\boxed{",
                device="cpu", steps=4, save_every=2, lr=1e-3, batch_prompts=2, seed=0, lr_schedule="linear")
    with monkeypatch.context() as m:
        killed_after(2, m)
        with pytest.raises(SystemExit):
            sft_train(TrainConfig(**base), next_contexts(2))
    for changed, names in [({"lr": 5e-2}, "lr differs: --lr 0.001 there"),
                           ({"batch_prompts": 4, "seed": 7}, "batch_prompts, seed differ"),
                           ({"steps": 6}, "--steps 6 runs past the 4 steps")]:
        with pytest.raises(UserError, match=names):
            sft_train(TrainConfig(**{**base, **changed}), next_contexts(2))
        assert [m["step"] for m in read_jsonl(tmp_path / "arm" / "metrics.jsonl")] == [1, 2]
    # runtime-only options may change (as for an rpt run): the resume continues where the kill left it
    totals = sft_train(TrainConfig(**{**base, "save_every": 1, "keep_checkpoints": 1}), next_contexts(2))
    metrics = read_jsonl(tmp_path / "arm" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and totals["steps"] == 4
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # one linear decay over 4
    # finished: asked again, the same options give its totals back; other ones are refused, not answered stale
    assert sft_train(TrainConfig(**base), next_contexts(2)) == totals
    with pytest.raises(UserError, match="lr differs"):
        sft_train(TrainConfig(**{**base, "lr": 5e-2}), next_contexts(2))
