"""Run provenance (issue 21): the run directory records its split and schedule horizon; eval and export given a run
(or one of its checkpoints) keep its held-out documents apart; a resume keeps the schedule and refuses changed
options (one rule with tagging's, issue 26)."""
import json
import shutil

import pytest
from click.testing import CliRunner
from shard_fixtures import length_reward, train_shards, tiny_tok  # noqa: F401

from rpt_common.errors import UserError
from rpt_train.checkpoint import latest_checkpoint, list_checkpoints
from rpt_train.config import EvalConfig, ExportConfig, TrainConfig, load_config, to_dict
from rpt_train.evaluate import eval_split, select_positions
from rpt_train.samples import ShardSet, is_heldout
from rpt_train.trainer import check_options, train

SPLIT = {"heldout_fraction": 0.4, "split_seed": 5}


def _run(shards, model, out, steps, **kw):
    cfg = dict(shards=str(shards), model=str(model), out=str(out), steps=steps, bucket="all", batch_prompts=2,
               group_size=2, max_new_tokens=4, lr=1e-3, save_every=1, keep_checkpoints=10, log_samples_every=0,
               device="cpu", dynamic_sampling=False) | kw
    return train(TrainConfig(**cfg), reward_fns=[length_reward], quiet=True)


def _lrs(out):
    return [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def run_dir(tiny_llama, train_shards, tmp_path_factory):
    return _run(train_shards, tiny_llama, tmp_path_factory.mktemp("prov") / "run", 1, **SPLIT)


def test_the_run_directory_records_its_split_and_horizon(run_dir, train_shards):
    record = json.loads((run_dir / "run.json").read_text())
    assert record["heldout_fraction"] == 0.4 and record["split_seed"] == 5
    assert record["schedule"] == {"lr_schedule": "constant", "warmup_steps": 0, "horizon": 1}


@pytest.mark.parametrize("which", ["run", "checkpoint"])
def test_eval_of_a_run_inherits_its_split(run_dir, train_shards, tiny_tok, which):
    model = str(run_dir if which == "run" else latest_checkpoint(run_dir))
    cfg = load_config(EvalConfig, None, {"shards": str(train_shards), "model": model, "limit": 50})
    assert (cfg.heldout_fraction, cfg.split_seed, eval_split(cfg)) == (0.4, 5, "heldout")
    chosen = select_positions(ShardSet(str(train_shards)), tiny_tok, cfg)
    docs = {s.doc_id for b in chosen.values() for s in b}
    assert docs and all(is_heldout(d, 0.4, 5) for d in docs)
    for split in ("train", "all"):  # said explicitly: the run's training documents too
        cfg = load_config(EvalConfig, None, {"shards": str(train_shards), "model": model, "split": split})
        assert eval_split(cfg) == split and cfg.heldout_fraction == 0.4
    plain = load_config(EvalConfig, None, {"shards": str(train_shards), "model": "demo"})
    assert (plain.heldout_fraction, plain.split_seed, eval_split(plain)) == (0.0, 0, "all")
    explicit = load_config(EvalConfig, None, {"shards": str(train_shards), "model": model, "heldout_fraction": 0.2})
    assert (explicit.heldout_fraction, explicit.split_seed) == (0.2, 5)
    # a run started from another run's checkpoint keeps that run's held-out documents out of its training too
    assert (TrainConfig(shards="x", model=model).heldout_fraction, EvalConfig(shards="x", model=model).split_seed) \
        == (0.4, 5)


def test_eval_json_meta_records_the_split(run_dir, train_shards, tmp_path):
    from rpt_train.cli import main

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--shards", str(train_shards), "--model", str(run_dir), "--limit", "2",
                                       "--samples", "1", "--max-new-tokens", "3", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads(out.read_text())["meta"]
    assert (meta["split"], meta["heldout_fraction"], meta["split_seed"]) == ("heldout", 0.4, 5)


def test_export_of_a_run_inherits_its_split(run_dir, train_shards, tmp_path):
    from rpt_train.export import export

    cfg = load_config(ExportConfig, None, {"shards": str(train_shards), "model": str(run_dir), "format": "openrlhf",
                                           "out": str(tmp_path / "x"), "progress": False})
    meta = export(cfg)
    assert meta["config"]["heldout_fraction"] == 0.4 and meta["config"]["split_seed"] == 5
    for split in ("train", "heldout"):
        docs = {json.loads(line)["doc_id"] for line in open(tmp_path / "x" / f"{split}.jsonl")}
        assert docs and all(is_heldout(d, 0.4, 5) == (split == "heldout") for d in docs)


def test_a_resume_keeps_the_schedule_horizon(tiny_llama, train_shards, tmp_path):
    """A 3-step cosine run resumed to 6 steps is refused (the lr would rise again); a run stopped at step 2 of 4
    and resumed (to 4, or to 3) follows the 4-step curve."""
    full = _run(train_shards, tiny_llama, tmp_path / "full", 4, lr_schedule="cosine")
    with pytest.raises(UserError, match=r"--steps 6 runs past the 4 steps over which the cosine --lr-schedule"):
        _run(train_shards, tiny_llama, full, 6, lr_schedule="cosine", resume=True)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for step, path in list_checkpoints(part)[2:]:  # stopped after step 2
        shutil.rmtree(path)
    lines = (part / "metrics.jsonl").read_text().splitlines()[:2]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _run(train_shards, tiny_llama, part, 3, lr_schedule="cosine", resume=True)  # stops early on the same curve
    assert _lrs(part) == _lrs(full)[:3]
    _run(train_shards, tiny_llama, part, 4, lr_schedule="cosine", resume=True)
    lrs = _lrs(part)
    assert lrs == _lrs(full) and all(b <= a for a, b in zip(lrs, lrs[1:]))
    const = _run(train_shards, tiny_llama, tmp_path / "const", 1)  # a constant schedule may run longer
    _run(train_shards, tiny_llama, const, 2, resume=True)
    assert len(_lrs(const)) == 2


def test_a_resume_refuses_changed_options(run_dir, tiny_llama, train_shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    with pytest.raises(UserError, match=r"other options \(batch_prompts differs: --batch-prompts 2 there\)"):
        _run(train_shards, tiny_llama, out, 2, resume=True, batch_prompts=3, **SPLIT)
    with pytest.raises(UserError, match=r"heldout_fraction, lr differ"):
        _run(train_shards, tiny_llama, out, 2, resume=True, lr=1e-2, split_seed=5)
    # options that change how, not what, is computed may change
    _run(train_shards, tiny_llama, out, 2, resume=True, save_every=2, eval_limit=3, **SPLIT)
    assert len(_lrs(out)) == 2


def test_a_resume_takes_a_written_out_think_close_for_auto(run_dir, tiny_llama, train_shards, tmp_path):
    """--think-close written out as the text `auto` resolves to (for --answer-format) is the same option on
    --resume, either way round; another text, or auto under another answer format, is still refused."""
    saved = to_dict(TrainConfig(shards="s", think_close="</think>\n\\boxed{"))
    check_options(saved, {**saved, "think_close": "auto"}, tmp_path)
    check_options({**saved, "think_close": "auto"}, saved, tmp_path)
    tag = to_dict(TrainConfig(shards="s", think_close="</think>\n<answer>", answer_format="answer_tag"))
    check_options(tag, {**tag, "think_close": "auto"}, tmp_path)
    with pytest.raises(UserError, match=r"\(think_close differs: --think-close '</think>\\n\\\\boxed\{' there\)"):
        check_options(saved, {**saved, "think_close": "</think>\n\\boxed{ "}, tmp_path)
    with pytest.raises(UserError, match=r"\(think_close differs"):
        check_options({**tag, "think_close": "</think>\n\\boxed{"}, {**tag, "think_close": "auto"}, tmp_path)
    out = tmp_path / "run"  # the run resumed (its config.yaml has auto) with the text written out
    shutil.copytree(run_dir, out)
    _run(train_shards, tiny_llama, out, 2, resume=True, think_close="</think>\n\\boxed{", **SPLIT)
    assert len(_lrs(out)) == 2
