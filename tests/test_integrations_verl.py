"""verl's own code on our export and reward (run by `make test-verl` in .venv-verl; skipped where verl is absent):
its reward loader (pkg:// and file path), both NaiveRewardManagers on a DataProto, and RLHFDataset on the parquet."""
import asyncio
import json
import shutil

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

from click.testing import CliRunner  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from shard_fixtures import train_shards  # noqa: E402,F401

import rpt_train.integrations.verl as adapter  # noqa: E402
from rpt_train.cli import main  # noqa: E402
from rpt_train.reward import extract_answer, prefix_match  # noqa: E402
from rpt_train.templates import PromptBuilder  # noqa: E402

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def exported(tiny_llama, train_shards, tmp_path_factory):
    """(tokenizer with a chat template, export directory) of a verl export with held-out documents."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("verl")
    model = root / "model"
    shutil.copytree(tiny_llama, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT
    tok.save_pretrained(model)
    r = CliRunner().invoke(main, ["export", "--shards", str(train_shards), "--model", str(model), "--out",
                                  str(root / "out"), "--format", "verl", "--bucket", "all", "--limit", "16",
                                  "--heldout-fraction", "0.3", "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return tok, root / "out"


def rlhf_dataset(tok, path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 4096, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(path.parent / "cache")})
    return RLHFDataset(data_files=[str(path)], tokenizer=tok, config=config)


def responses_for(rows):
    """Per row: a correct, a wrong, an unanswered and a think-then-answer response (whole texts)."""
    out = []
    for row in rows:
        labels = json.loads(row["reward_model"]["ground_truth"])["label_tokens"]
        out += [f"I think \\boxed{{{labels[0]}}}", "\\boxed{zzz}", "no idea",
                f"<think>\\boxed{{{labels[0]}}}</think>\\boxed{{{''.join(labels)}q}}"]
    return out


def data_proto(tok, rows, texts):
    """A rollout batch as verl's trainer hands it to a reward manager: left-padded prompts, right-padded
    responses ending in EOS, the rows' non-tensor fields."""
    from verl import DataProto

    per = len(texts) // len(rows)
    prompts = [tok.apply_chat_template(rows[i // per]["prompt"], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for i in range(len(texts))]
    prompts = [p["input_ids"] if isinstance(p, dict) else list(p) for p in prompts]
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    P, R, pad = max(map(len, prompts)), max(map(len, responses)), tok.pad_token_id
    prompt_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (R - len(r)) for r in responses])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (R - len(r))
                         for p, r in zip(prompts, responses)])
    pick = [rows[i // per] for i in range(len(texts))]
    non_tensors = {k: np.array([r[k] for r in pick], dtype=object) for k in ("data_source", "reward_model", "extra_info")}
    return DataProto.from_dict(tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask,
                                        "input_ids": torch.cat([prompt_ids, response_ids], 1)},
                               non_tensors=non_tensors)


def expected(rows, texts):
    per = len(texts) // len(rows)
    labels = [json.loads(row["reward_model"]["ground_truth"])["label_tokens"] for row in rows]
    return [1.0 if prefix_match(extract_answer(t), labels[i // per]) else 0.0 for i, t in enumerate(texts)]


def test_rlhf_dataset_reads_the_export_and_renders_our_prompt(exported):
    tok, out = exported
    ds = rlhf_dataset(tok, out / "train.parquet")
    assert len(ds) == 16
    item = ds[0]
    label = json.loads(item["reward_model"]["ground_truth"])
    assert item["data_source"] == "rpt" and isinstance(label["label_tokens"], list)
    rendered = tok.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
    context = item["raw_prompt"][0]["content"].split("### Context\n", 1)[1]
    assert rendered == PromptBuilder(tok).text(context)  # verl's rollout prompt = `rpt-train run`'s
    assert len(rlhf_dataset(tok, out / "heldout.parquet")) > 0


@pytest.mark.parametrize("path", ["pkg://rpt_train.integrations.verl", adapter.__file__])
def test_verl_loader_and_reward_managers_score_like_rpt_train(exported, path):
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager as LoopManager
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager import NaiveRewardManager

    tok, out = exported
    rows = rlhf_dataset(tok, out / "train.parquet")
    rows = [rows[i] for i in range(4)]
    texts = responses_for(rows)
    config = OmegaConf.create({"reward": {"custom_reward_function": {"path": path, "name": "compute_score"}}})
    fn = get_custom_reward_fn(config)
    want = expected(rows, texts)
    assert 0 < sum(want) < len(want)
    # the batch manager: one score per response, at its last valid token
    scores = NaiveRewardManager(tokenizer=tok, num_examine=0, compute_score=fn)(data_proto(tok, rows, texts)).sum(-1)
    assert scores.tolist() == want
    # the reward-loop manager that verl >= 0.7's trainer runs, one sample at a time
    loop = LoopManager(config=config, tokenizer=tok, compute_score=fn)
    batch = data_proto(tok, rows, texts)
    got = [loop.loop.run_until_complete(loop.run_single(batch[i:i + 1]))["reward_score"] for i in range(len(texts))]
    assert got == want


def test_reward_kwargs_reach_compute_score(exported):
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://rpt_train.integrations.verl", "name": "compute_score",
        "reward_kwargs": {"wrong": -0.5, "no_answer": -1.0}}}})
    fn = get_custom_reward_fn(config)
    assert fn(data_source="rpt", solution_str="\\boxed{zzz}", ground_truth='["a"]', extra_info={}) == -0.5
    assert fn(data_source="rpt", solution_str="nothing", ground_truth='["a"]', extra_info={}) == -1.0
    assert asyncio.iscoroutinefunction(fn) is False
