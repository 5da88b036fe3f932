"""Engine adapters: one reward definition behind verl's, TRL's and OpenRLHF's signatures (hypothesis property),
OpenRLHF's reward file loaded by path the way its trainer loads it, and a real TRL GRPOTrainer run on an export."""
import asyncio
import importlib.util
import json
import os
from types import SimpleNamespace
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shard_fixtures import tiny_tok, train_shards  # noqa: F401

import rpt_train.integrations.openrlhf as orl_module
from rpt_train.integrations import reward_values
from rpt_train.integrations.trl import make_rpt_reward, rpt_reward
from rpt_train.integrations.verl import compute_score
from rpt_train.reward import extract_answer, prefix_match


@contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def load_openrlhf_reward_file():
    """As openrlhf.utils.agent.SingleTurnAgentExecutor does with --reward.remote_url *.py."""
    spec = importlib.util.spec_from_file_location("reward_func", orl_module.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


PIECES = [" the", "the", " ", "a", "é", "日本", "}", "{", "x_", "\\boxed{", "</think>", "<think>", "\n"]
labels_st = st.lists(st.sampled_from([p for p in PIECES if p not in ("\\boxed{", "</think>")]), min_size=1, max_size=4)
completion_st = st.lists(st.sampled_from(PIECES + ["\\boxed{ the}", "\\boxed{}", "}}", "yes"]), max_size=8).map("".join)


@settings(max_examples=150, deadline=None)
@given(labels=labels_st, completion=completion_st, answer_from_labels=st.integers(0, 4),
       prefix=st.sampled_from(["", "\\boxed{"]))
def test_adapters_agree_with_rpt_train_reward(labels, completion, answer_from_labels, prefix):
    if answer_from_labels:  # often a real (possibly partial) label prefix, so that matches happen
        completion += "\\boxed{" + "".join(labels[:answer_from_labels]) + "}"
    full = prefix + completion  # the whole response; an engine that prefilled `prefix` returns `completion` only
    expected = 1.0 if prefix_match(extract_answer(full), labels) else 0.0
    label = json.dumps(labels)
    prompt = "### Context\nsome text" + prefix
    assert compute_score("rpt", completion, label, {"response_prefix": prefix}) == expected
    if not prefix:
        assert compute_score("rpt", completion, label, {"index": 0}) == expected
    assert rpt_reward([prompt], [completion], [labels], response_prefix=[prefix]) == [expected]
    conversational = [[{"role": "user", "content": "### Context\nsome text"}]]  # TRL cannot prefill these
    assert rpt_reward(conversational, [[{"role": "assistant", "content": full}]], [labels],
                      response_prefix=[""]) == [expected]
    with env(RPT_RESPONSE_PREFIX=prefix):
        out = load_openrlhf_reward_file()([prompt + completion + "<|endoftext|>"], [prompt], [label])
    assert out["rewards"].tolist() == [expected] and out["scores"].tolist() == [expected]


def test_openrlhf_return_format_feeds_its_samples_generator():
    reward_func = load_openrlhf_reward_file()
    labels = json.dumps([" the", " fox"])
    prompt = "<|user|>predict<|end|><|assistant|>\\boxed{"
    queries = [prompt + " the fox}<|end|>", prompt + " dog}<|end|>", prompt + "<|end|>"]
    with env(RPT_RESPONSE_PREFIX="\\boxed{", RPT_REWARD_NO_ANSWER="-0.5"):
        infos = [reward_func([q], [prompt], [labels]) for q in queries]  # OpenRLHF scores one query per call
    # openrlhf.trainer.ppo_utils.samples_generator: info["reward"] = torch.tensor([reward_val]), reward_val = rewards
    assert [torch.tensor([i["rewards"]]).flatten().tolist() for i in infos] == [[1.0], [0.0], [-0.5]]
    assert [i["scores"].tolist() for i in infos] == [[1.0], [0.0], [0.0]]  # correctness, for dynamic filtering
    assert all(isinstance(v, float) for i in infos for v in i["extra_logs"].values())


def test_openrlhf_single_turn_executor_with_our_reward_file(tiny_tok):
    """OpenRLHF's own rollout executor (generation faked): it loads the file, tokenizes, decodes and scores."""
    agent = pytest.importorskip("openrlhf.utils.agent")
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=orl_module.__file__)

    class Engine:  # the vLLM engine's generate(), returning one completion of `response`
        def __init__(self, response):
            self.ids = tiny_tok(response, add_special_tokens=False)["input_ids"] + [tiny_tok.eos_token_id]

        async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
            out = SimpleNamespace(token_ids=self.ids, finish_reason="stop", logprobs=None)
            return SimpleNamespace(outputs=[out])

    prompt, label = "### Context\nThe quick brown\\boxed{", json.dumps([" fox", " jumps"])
    params = SimpleNamespace(max_tokens=16, logprobs=None)
    got = []
    with env(RPT_RESPONSE_PREFIX="\\boxed{", RPT_REWARD_NO_ANSWER="-1"):
        for response in [" fox}", " fox jumps} more", " dog}", " fox", " dog}</think>\\boxed{ fox}"]:
            out = asyncio.run(executor.execute(prompt, label, params, 128, tiny_tok, Engine(response)))
            assert out["reward"] is not None, "the executor swallowed an error from our reward file"
            got.append(float(torch.tensor([out["reward"]]).flatten()[0]))
    assert got == [1.0, 1.0, 0.0, -1.0, 1.0]


def test_reward_values_from_kwargs_then_env():
    assert reward_values() == (1.0, 0.0, 0.0)
    with env(RPT_REWARD_CORRECT="2", RPT_REWARD_WRONG="-1"):
        assert reward_values() == (2.0, -1.0, 0.0)
        assert reward_values(correct=3.0) == (3.0, -1.0, 0.0)
        assert compute_score("rpt", "\\boxed{b}", '["a"]') == -1.0
    assert compute_score("rpt", "no answer", '["a"]', None, no_answer=-0.25) == -0.25
    assert compute_score("rpt", "\\boxed{a}", '["a"]', None, correct=5.0) == 5.0


def test_bad_label_says_what_was_expected():
    with pytest.raises(ValueError, match="list of strings"):
        compute_score("rpt", "\\boxed{a}", '"a"')
    with pytest.raises(ValueError, match="list of strings"):
        rpt_reward(["p"], ["\\boxed{a}"], [[1, 2]])


def test_trl_grpo_trainer_logs_our_reward_of_its_completions(tiny_llama, train_shards, tmp_path):
    """A real GRPOTrainer (CPU, 2 steps) on an exported dataset: what it logs equals rpt_train's reward."""
    from click.testing import CliRunner
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rpt_train.cli import main

    out = tmp_path / "export"
    r = CliRunner().invoke(main, ["export", "--shards", str(train_shards), "--model", str(tiny_llama), "--out", str(out),
                                  "--format", "trl", "--bucket", "all", "--limit", "8", "--template", "answer-only",
                                  "--response-prefix", "\\boxed{", "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    dataset = load_dataset("parquet", data_files=str(out / "train.parquet"), split="train")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    # A random tiny policy never closes a box: bias sampling towards "}" and the labels' first tokens so that
    # correct, wrong and unanswered completions all occur.
    first = {tok(row["label_tokens"][0], add_special_tokens=False)["input_ids"][0] for row in dataset}
    bias = {(tok.convert_tokens_to_ids("}"),): 6.0, **{(t,): 5.0 for t in first}}
    reward = make_rpt_reward(correct=1.0, wrong=0.25, no_answer=-1.0)
    seen = []

    def rpt(prompts, completions, label_tokens, response_prefix, **kwargs):
        values = reward(prompts, completions, label_tokens, response_prefix=response_prefix, **kwargs)
        seen.append((prompts, completions, label_tokens, values))
        return values

    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=3, learning_rate=1e-6, logging_steps=1, report_to="none", use_cpu=True,
                      bf16=False, save_strategy="no", seed=0, temperature=1.0, generation_kwargs={"sequence_bias": bias},
                      dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=str(tiny_llama), reward_funcs=[rpt], args=args, train_dataset=dataset,
                          processing_class=tok)
    trainer.train()
    assert len(seen) == 2
    values = {1.0: 0, 0.25: 0, -1.0: 0}
    for prompts, completions, labels, got in seen:
        assert all(isinstance(c, str) for c in completions) and all(p.endswith("\\boxed{") for p in prompts)
        ours = [(1.0 if prefix_match(extract_answer("\\boxed{" + c), lab) else 0.25)
                if extract_answer("\\boxed{" + c) is not None else -1.0 for c, lab in zip(completions, labels)]
        assert got == ours
        for v in got:
            values[v] += 1
    logged = [h["rewards/rpt/mean"] for h in trainer.state.log_history if "rewards/rpt/mean" in h]
    assert logged == pytest.approx([sum(v) / len(v) for *_, v in seen])
    assert sum(1 for n in values.values() if n) >= 2, values  # the rewards vary: the test can tell them apart
