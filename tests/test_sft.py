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
        with pytest.raises(UserError, match=names) as refused:
            sft_train(TrainConfig(**{**base, **changed}), next_contexts(2))
        assert "allow-changed" not in str(refused.value)  # sft has no --allow-changed: no hint to follow
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


def sft_base(tiny_llama, train_shards, out, **kw) -> dict:
    return dict(shards=str(train_shards), model=str(tiny_llama), out=str(out), bucket="all", micro_batch_size=2,
                template="answer-only", chat_template="off", response_prefix="\\boxed{", device="cpu", steps=4,
                save_every=2, lr=1e-3, batch_prompts=2, seed=0) | kw


def test_sft_resume_compares_only_what_its_result_depends_on(tiny_llama, train_shards, tmp_path, monkeypatch):
    """Options SFT never reads (every RL-only one) or that change how, not what, it computes (micro_batch_size: the
    loss is a token mean over the whole step) may change on resume; one it reads (--lr, label_tokens) may not."""
    from rpt_train.sft import next_contexts, read_jsonl, sft_train

    base = sft_base(tiny_llama, train_shards, tmp_path / "arm")
    with monkeypatch.context() as m:
        killed_after(2, m)
        with pytest.raises(SystemExit):
            sft_train(TrainConfig(**base), next_contexts(2))
    with pytest.raises(UserError, match="lr differs"):
        sft_train(TrainConfig(**{**base, "lr": 5e-2, "micro_batch_size": 1}), next_contexts(2))
    with pytest.raises(UserError, match="label_tokens differs"):
        sft_train(TrainConfig(**base), next_contexts(2), label_tokens=2)
    other = {"micro_batch_size": 1, "gradient_checkpointing": True, "rollout_batch_size": 8, "static_cache": True,
             "group_size": 4, "loss": "dapo", "temperature": 0.5, "clip_low": 0.1, "beta": 0.1, "ntp_weight": 0.5,
             "max_new_tokens": 16, "sampler": "learnability", "dynamic_sampling": False, "reward_wrong": -1.0}
    moved = tmp_path / "moved-model"  # the model's path is not compared (the weights come from the checkpoint)
    moved.symlink_to(tiny_llama, target_is_directory=True)
    other["model"] = str(moved)
    totals = sft_train(TrainConfig(**{**base, **other}), next_contexts(2))
    assert [m["step"] for m in read_jsonl(tmp_path / "arm" / "metrics.jsonl")] == [1, 2, 3, 4] and totals["steps"] == 4
    # finished, it is asked with the model path it finished with (a finished arm compares the path as given)
    finished = {**base, "model": str(moved)}
    assert sft_train(TrainConfig(**{**finished, "group_size": 16, "micro_batch_size": 3}), next_contexts(2)) == totals
    with pytest.raises(UserError, match="lr differs"):
        sft_train(TrainConfig(**{**base, "lr": 5e-2}), next_contexts(2))


def test_sft_finished_arm_is_checked_without_its_trainer_state(tiny_llama, train_shards, tmp_path, monkeypatch):
    """A finished arm asked again reads its options from sft.json (an older sft.json without them: the last
    checkpoint's trainer_state.json), never the checkpoint's trainer_state.pt (the optimizer moments): removed or
    truncated, the same options still give its totals back, other ones are still refused."""
    import json

    from rpt_train.checkpoint import STATE, latest_checkpoint
    from rpt_train.sft import next_contexts, sft_train

    base = sft_base(tiny_llama, train_shards, tmp_path / "arm", lr_schedule="linear", steps=2)
    totals = sft_train(TrainConfig(**base), next_contexts(2))
    ckpt = latest_checkpoint(tmp_path / "arm")
    for damage in ("truncate", "remove"):
        if damage == "truncate":
            (ckpt / STATE).write_bytes((ckpt / STATE).read_bytes()[:100])
        else:
            (ckpt / STATE).unlink()
        monkeypatch.setattr(checkpoint, "load_trainer_state", lambda *a: pytest.fail("trainer_state.pt loaded"))
        assert sft_train(TrainConfig(**{**base, "micro_batch_size": 1}), next_contexts(2)) == totals
        with pytest.raises(UserError, match="lr differs"):
            sft_train(TrainConfig(**{**base, "lr": 5e-2}), next_contexts(2))
        with pytest.raises(UserError, match="--steps 3 runs past the 2 steps"):
            sft_train(TrainConfig(**{**base, "steps": 3}), next_contexts(2))
    record = json.loads((tmp_path / "arm" / "sft.json").read_text())
    assert record["options"]["lr"] == 1e-3 and record["horizon"] == 2
    # an sft.json written before it recorded the options: the checkpoint's trainer_state.json has them
    (tmp_path / "arm" / "sft.json").write_text(json.dumps(totals))
    (ckpt / STATE).write_bytes(b"")  # truncated to nothing (a missing one is no checkpoint at all)
    assert sft_train(TrainConfig(**base), next_contexts(2)) == totals
    with pytest.raises(UserError, match="seed differs"):
        sft_train(TrainConfig(**{**base, "seed": 3}), next_contexts(2))


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "wordpiece"])
def test_sft_samples_cut_labels_to_an_answer_under_objective_rlp_too(kind, train_shards):
    """SFT's targets are answers: its samples (TrainSamples(answers=True)) cut the labels as rpt's do, also when the
    spec's base says --objective rlp (whose own samples keep the true next tokens uncut)."""
    from data_helpers import make_tokenizer_of
    from test_train_objectives import BRACE_CUTS

    from rpt_train.samples import TrainSamples

    tok = make_tokenizer_of(kind)
    if kind == "wordpiece":
        tok.add_tokens(["{", "}"])
    build = {(obj, answers): TrainSamples(TrainConfig(shards=str(train_shards), objective=obj, labels_length=4), tok,
                                          answers=answers).build
             for obj, answers in [("rpt", None), ("rlp", None), ("rlp", True)]}
    row, differs = {"doc_id": "d", "window_index": 0}, 0
    for context, continuation in BRACE_CUTS:
        rpt, rlp, sft = (build[k]._sample(row, (context, continuation), "", 3, 1.0) for k in build)
        assert (sft and sft.label_tokens) == (rpt and rpt.label_tokens), (kind, context)
        differs += (rlp and rlp.label_tokens) != (rpt and rpt.label_tokens)
    assert differs  # the case matters: rlp's own labels are uncut


def test_sft_arm_cuts_under_objective_rlp_and_counts_dropped_contexts(tiny_llama, train_shards, tmp_path,
                                                                      monkeypatch, capsys):
    """sft_train builds its samples with answers (the answer format), whatever --objective; a context its `batches`
    gives as None (same_contexts: an rlp arm's position whose label no answer can express) is dropped, counted in
    the totals' `dropped` and said on stderr."""
    import rpt_train.samples as samples
    from rpt_train.sft import next_contexts, same_contexts, sft_train

    formats, real = [], samples.SampleBuilder

    def spy(*a, **kw):
        formats.append(kw.get("answer_format"))
        return real(*a, **kw)
    monkeypatch.setattr(samples, "SampleBuilder", spy)
    nxt = next_contexts(2)
    totals = sft_train(TrainConfig(**sft_base(tiny_llama, train_shards, tmp_path / "arm", objective="rlp", steps=2)),
                       lambda data, step: [None, *nxt(data, step)])
    assert formats == ["boxed"] and totals["dropped"] == 2 and totals["contexts"] == 4
    assert "2 of the contexts given gave no sample and were dropped" in capsys.readouterr().err

    class Data:
        class build:
            many = staticmethod(lambda contexts: [None if c == "x" else c for c in contexts])
    path = tmp_path / "contexts.jsonl"
    path.write_text('{"step": 1, "contexts": ["a", "x", "b"]}\n')
    assert same_contexts(path)(Data, 1) == ["a", None, "b"]


def test_sft_damaged_record_is_refused_naming_the_file_and_written_atomically(tiny_llama, train_shards, tmp_path,
                                                                              monkeypatch):
    """A damaged sft.json (truncated, empty, not a JSON object) is one UserError naming it and saying to delete it;
    deleted, the arm's finish is redone from its last checkpoint (the same totals). sft.json is written atomically
    (evaluate.write_json: a temp file renamed into place)."""
    import rpt_train.evaluate as evaluate
    from rpt_train.sft import next_contexts, sft_train

    import json

    written, real = [], evaluate.write_json
    monkeypatch.setattr(evaluate, "write_json", lambda result, path: (written.append(str(path)), real(result, path)))
    base = sft_base(tiny_llama, train_shards, tmp_path / "arm", steps=2)
    totals = sft_train(TrainConfig(**base), next_contexts(2))
    path = tmp_path / "arm" / "sft.json"
    assert written == [str(path)]
    good = path.read_text()
    for bad in (good[:len(good) // 2], "", "[]", "null", "7"):
        path.write_text(bad)
        with pytest.raises(UserError, match=r"sft\.json' is (damaged|unreadable).*delete it to redo the arm's finish"):
            sft_train(TrainConfig(**base), next_contexts(2))
    path.unlink()
    assert sft_train(TrainConfig(**base), next_contexts(2)) == totals
    assert json.loads(path.read_text()) == json.loads(good)


def test_sft_finished_arm_asked_with_other_steps_model_or_budget_is_refused(tiny_llama, tiny_qwen2, train_shards,
                                                                            tmp_path, monkeypatch):
    """A finished arm asked with another --steps (a constant schedule: no horizon to check), another --model path
    (compared as given) or another token budget (max_tokens: a FLOP-matched arm's) is refused, naming the option,
    old and new value; an sft.json written before it recorded them is accepted. A resume with another budget is
    refused too (its checkpoint records it), one with another model path is not (the weights are the checkpoint's)."""
    import json

    from rpt_train.sft import next_contexts, read_jsonl, sft_train

    base = sft_base(tiny_llama, train_shards, tmp_path / "arm", steps=2)
    totals = sft_train(TrainConfig(**base), next_contexts(2), max_tokens=10**6)
    assert sft_train(TrainConfig(**{**base, "micro_batch_size": 1}), next_contexts(2), max_tokens=10**6) == totals
    for changed, budget, says in [({"steps": 8}, 10**6, "--steps: 2 there, 8 now"),
                                  ({"model": str(tiny_qwen2)}, 10**6,
                                   f"--model \\(its path as given.*\\): '{tiny_llama}' there, '{tiny_qwen2}' now"),
                                  ({}, 5, "the token budget max_tokens .*: 1000000 there, 5 now"),
                                  ({}, None, "the token budget .*: 1000000 there, None now")]:
        with pytest.raises(UserError, match=f"finished sft arm run with other options \\({says}"):
            sft_train(TrainConfig(**{**base, **changed}), next_contexts(2), max_tokens=budget)
    # an sft.json written before it recorded them: accepted (nothing to check them against)
    path = tmp_path / "arm" / "sft.json"
    record = json.loads(path.read_text())
    del record["asked"]
    path.write_text(json.dumps(record))
    assert sft_train(TrainConfig(**{**base, "steps": 8}), next_contexts(2), max_tokens=5) == totals

    resumed = sft_base(tiny_llama, train_shards, tmp_path / "resumed")
    with monkeypatch.context() as m:
        killed_after(2, m)
        with pytest.raises(SystemExit):
            sft_train(TrainConfig(**resumed), next_contexts(2), max_tokens=10**6)
    for budget in (5, None):
        with pytest.raises(UserError, match=f"another token budget \\(max_tokens.*: 1000000 there, {budget} now"):
            sft_train(TrainConfig(**resumed), next_contexts(2), max_tokens=budget)
    assert [m["step"] for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2]
    moved = tmp_path / "moved-model"
    moved.symlink_to(tiny_llama, target_is_directory=True)
    assert sft_train(TrainConfig(**{**resumed, "model": str(moved)}), next_contexts(2), max_tokens=10**6)["steps"] == 4
