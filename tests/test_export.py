"""`rpt-train export`: the samples `run` draws, in each engine's schema, train and held-out apart, deterministic,
the same in any batch size, and refusals (exit 2, one sentence) where an engine cannot reproduce the prompt."""
import json
import shutil

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from shard_fixtures import train_shards  # noqa: F401

from rpt_train.cli import main
from rpt_train.config import TrainConfig, load_config
from rpt_train.samples import TrainSamples, is_heldout
from rpt_train.templates import PromptBuilder

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def export(shards, model, out, *extra):
    r = invoke("export", "--shards", shards, "--model", model, "--out", out, "--no-progress", *extra)
    assert r.exit_code == 0, r.output
    return json.loads((out / "export.json").read_text())


@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory):
    """tiny_llama with a small chat template."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_llama, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT
    tok.save_pretrained(d)
    return d


def test_trl_export_is_runs_draw_order_with_policy_labels(tiny_llama, train_shards, tmp_path):
    out = tmp_path / "trl"
    meta = export(train_shards, tiny_llama, out, "--format", "trl", "--bucket", "all", "--limit", 12,
                  "--heldout-fraction", 0.3, "--seed", 3, "--template", "answer-only", "--response-prefix", "\\boxed{")
    rows = pq.read_table(out / "train.parquet").to_pylist()
    cfg = load_config(TrainConfig, None, {"shards": str(train_shards), "model": str(tiny_llama), "bucket": "all",
                                          "heldout_fraction": 0.3, "seed": 3, "template": "answer-only",
                                          "response_prefix": "\\boxed{"})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    drawn = TrainSamples(cfg, tok).next_batch(12)  # what `rpt-train run` would train on first
    prompts = PromptBuilder(tok, "answer-only", "auto", "\\boxed{")
    assert [r["key"] for r in rows] == [s.key for s in drawn]
    assert [r["label_tokens"] for r in rows] == [s.label_tokens for s in drawn]
    assert [r["prompt"] for r in rows] == [prompts.text(s.context) for s in drawn]
    assert all(r["prompt"].endswith("\\boxed{") and r["response_prefix"] == "\\boxed{" for r in rows)
    held = pq.read_table(out / "heldout.parquet").to_pylist()
    assert held and meta["files"]["heldout"]["rows"] == len(held) and meta["files"]["train"]["rows"] == 12
    assert not any(is_heldout(r["doc_id"], 0.3, 0) for r in rows)
    assert all(is_heldout(r["doc_id"], 0.3, 0) for r in held)


def test_verl_export_schema(chat_model, train_shards, tmp_path):
    out = tmp_path / "verl"
    export(train_shards, chat_model, out, "--format", "verl", "--bucket", "hard", "--heldout-fraction", 0.3)
    table = pq.read_table(out / "train.parquet")
    assert table.schema.names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    rows = table.to_pylist()
    first = rows[0]
    assert first["data_source"] == "rpt" and first["reward_model"]["style"] == "rule"
    assert [m["role"] for m in first["prompt"]] == ["user"] and "### Context\n" in first["prompt"][0]["content"]
    labels = json.loads(first["reward_model"]["ground_truth"])["label_tokens"]
    assert isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)
    assert {r["extra_info"]["bucket"] for r in rows} == {"hard"} and all(r["extra_info"]["entropy"] > 1.5 for r in rows)
    assert [r["extra_info"]["index"] for r in rows] == list(range(len(rows)))
    assert {r["extra_info"]["split"] for r in pq.read_table(out / "heldout.parquet").to_pylist()} == {"heldout"}


def test_openrlhf_export_renders_the_chat_template(chat_model, train_shards, tmp_path):
    out = tmp_path / "orl"
    export(train_shards, chat_model, out, "--format", "openrlhf", "--bucket", "all", "--limit", 5)
    rows = [json.loads(x) for x in open(out / "train.jsonl")]
    assert len(rows) == 5 and not (out / "heldout.jsonl").exists()
    assert all(r["input"].startswith("<|user|>") and r["input"].endswith("<|assistant|>") for r in rows)
    assert all(isinstance(json.loads(r["label"])["label_tokens"], list) for r in rows)


def test_trl_export_is_conversational_with_a_chat_template(chat_model, train_shards, tmp_path):
    out = tmp_path / "conv"
    export(train_shards, chat_model, out, "--format", "trl", "--bucket", "all", "--limit", 3)
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert [[m["role"] for m in r["prompt"]] for r in rows] == [["user"]] * 3


def test_deterministic_under_seed_and_batch_size(tiny_llama, train_shards, tmp_path):
    base = ["--format", "openrlhf", "--bucket", "all", "--heldout-fraction", 0.3]  # 0.2 holds out none of 6: refused
    export(train_shards, tiny_llama, tmp_path / "a", *base, "--seed", 1)
    export(train_shards, tiny_llama, tmp_path / "b", *base, "--seed", 1, "--batch-rows", 7)
    export(train_shards, tiny_llama, tmp_path / "c", *base, "--seed", 2)
    for split in ("train.jsonl", "heldout.jsonl"):
        a, b = (tmp_path / "a" / split).read_bytes(), (tmp_path / "b" / split).read_bytes()
        assert a == b
    c = (tmp_path / "c" / "train.jsonl").read_text().splitlines()
    a = (tmp_path / "a" / "train.jsonl").read_text().splitlines()
    assert a != c and sorted(a) == sorted(c)  # same positions (one pass each), another order


@pytest.mark.parametrize("case,message", [
    (["--format", "verl"], "has none"),  # tiny_llama has no chat template
    (["--format", "verl", "--chat-template", "off"], "has none"),
    (["--format", "pytorch"], "--format must be"),
    (["--format", "trl", "--bucket", "extreme"], "--bucket must be"),
])
def test_refusals_are_one_sentence(case, message, tiny_llama, train_shards, tmp_path):
    r = invoke("export", "--shards", train_shards, "--model", tiny_llama, "--out", tmp_path / "x", *case)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_verl_refuses_a_response_prefix_and_out_is_required(chat_model, train_shards, tmp_path):
    r = invoke("export", "--shards", train_shards, "--model", chat_model, "--out", tmp_path / "x", "--format", "verl",
               "--response-prefix", "\\boxed{")
    assert r.exit_code == 2 and "cannot prefill" in r.output
    r = invoke("export", "--shards", train_shards, "--model", chat_model, "--format", "trl")
    assert r.exit_code == 2 and "--out" in r.output


def test_existing_export_needs_overwrite(tiny_llama, train_shards, tmp_path):
    args = ["--format", "openrlhf", "--bucket", "all", "--limit", 2]
    export(train_shards, tiny_llama, tmp_path / "o", *args)
    r = invoke("export", "--shards", train_shards, "--model", tiny_llama, "--out", tmp_path / "o", *args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    export(train_shards, tiny_llama, tmp_path / "o", *args, "--overwrite")


def test_openrlhf_prompt_ids_are_runs_with_a_bos_tokenizer(train_shards, tmp_path):
    """OpenRLHF tokenizes `input` with add_special_tokens=False: for a policy without a chat template whose
    tokenizer adds a BOS (Llama-2/Mistral base), `input` starts with the BOS text, so its ids are `run`'s."""
    from tiny import make_model_dir
    from transformers import AutoTokenizer

    model = make_model_dir(tmp_path / "bos-model", bos=True)
    out = tmp_path / "orl"
    meta = export(train_shards, model, out, "--format", "openrlhf", "--bucket", "all", "--limit", 4)
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(x) for x in open(out / "train.jsonl")]
    assert meta["openrlhf_prompt_lead"] == "<s>" and len(rows) == 4
    prompts = PromptBuilder(tok, "v0", "auto")
    assert not prompts.chat
    for r in rows:
        text = r["input"][len("<s>"):]  # PromptBuilder.text of the row's context
        theirs = tok(r["input"], add_special_tokens=False)["input_ids"]  # openrlhf.utils.agent, line 216
        assert theirs[0] == tok.bos_token_id and theirs == tok(text)["input_ids"]  # PromptBuilder.ids


def test_a_run_recipes_reward_settings_reach_every_row(tiny_llama, train_shards, tmp_path):
    """reward_correct / wrong / no_answer, answer_format and the --think-budget gate of a `run` recipe are carried
    in each row (verl, OpenRLHF: the label; TRL: the `rpt_reward` column) and export.json; extra reward functions,
    which no engine adapter runs, are warned about."""
    from rpt_train.integrations.openrlhf import reward_func
    from rpt_train.integrations.trl import rpt_reward

    recipe = tmp_path / "run.yaml"
    recipe.write_text("bucket: all\nreward_no_answer: -1\nanswer_format: answer_tag\nreward: [format]\n"
                      "run:\n  reward_correct: 2\n  think_budget: 64\n")
    want = {"correct": 2.0, "wrong": 0.0, "no_answer": -1.0, "answer_format": "answer_tag", "think_required": True}
    r = invoke("export", recipe, "--shards", train_shards, "--model", tiny_llama, "--out", tmp_path / "o",
               "--format", "openrlhf", "--limit", 3, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "extra reward functions ['format'] are not exported" in r.stderr
    assert json.loads((tmp_path / "o" / "export.json").read_text())["rpt_reward"] == want
    rows = [json.loads(x) for x in open(tmp_path / "o" / "train.jsonl")]
    assert all(json.loads(row["label"])["rpt_reward"] == want for row in rows)
    row = rows[0]
    answer = "</think><answer>" + json.loads(row["label"])["label_tokens"][0] + "</answer>"
    out = reward_func([row["input"] + answer, row["input"] + answer[8:]], [row["input"]] * 2, [row["label"]] * 2)
    assert out["rewards"].tolist() == [2.0, -1.0]  # no </think>: the no-answer reward, as `run` with a budget
    r = invoke("export", recipe, "--shards", train_shards, "--model", tiny_llama, "--out", tmp_path / "t",
               "--format", "trl", "--limit", 3, "--no-progress")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "t" / "train.parquet").to_pylist()
    assert all(json.loads(row["rpt_reward"]) == want for row in rows)
    row = rows[0]
    answer = "</think><answer>" + row["label_tokens"][0] + "</answer>"
    assert rpt_reward([row["prompt"]], [answer], [row["label_tokens"]], response_prefix=[row["response_prefix"]],
                      rpt_reward=[row["rpt_reward"]]) == [2.0]


def test_size_estimate_probe_keeps_its_order_in_a_scratch_file(tiny_llama, train_shards, tmp_path, monkeypatch):
    """Every PositionSampler of an export (the probe's too) keeps its permutation in a scratch file, as `run`'s:
    4 bytes a position in the heap otherwise (4 GB at 1B positions)."""
    import rpt_train.export as ex

    made = []

    class Recording(ex.PositionSampler):
        def __init__(self, n, seed, directory=None):
            made.append(directory)
            super().__init__(n, seed, directory=directory)

    monkeypatch.setattr(ex, "PositionSampler", Recording)
    export(train_shards, tiny_llama, tmp_path / "o", "--format", "openrlhf", "--bucket", "all", "--limit", 2,
           "--heldout-fraction", 0.3)
    assert len(made) == 2 and all(made)  # the probe and the held-out stream (the training one: TrainSamples)
