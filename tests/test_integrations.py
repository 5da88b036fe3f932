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
    if not prefix:  # verl cannot prefill a prefix (refused: test_verl_refuses_a_response_prefix_...)
        assert compute_score("rpt", completion, label, {"response_prefix": prefix}) == expected
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
    reward = make_rpt_reward(correct=1.0, wrong=0.25, no_answer=-1.0, tokenizer=tok)  # decodes completion_ids
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


# ---- the engines' reward equals `run`'s (review 9) -------------------------------------------------------------
def llama2_style_tokenizer(chat_template: str | None = None):
    """A Llama-2-style SentencePiece tokenizer: Metaspace (prepend first), a decoder that strips the first leading
    space, byte-fallback tokens that are no special tokens (so '}' decodes), `<s>` / `</s>`."""
    from data_helpers import TOKENIZER_CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.train_from_iterator(TOKENIZER_CORPUS * 5 + ["\\boxed{ lazy} {x} [INST] [/INST]"] * 5, trainer=trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def prefilled_completion(kind):
    """(tokenizer, prompt text, generated ids, labels, our reward) for a right answer after the response prefix
    '\\boxed{': the completion's first token is '▁lazy' for a SentencePiece (Metaspace) tokenizer."""
    from data_helpers import make_tokenizer_of

    from rpt_train.reward import RewardInput, rpt_reward as ours
    from rpt_train.rollout import completion_texts
    from rpt_train.samples import label_pieces
    from rpt_train.templates import PromptBuilder

    tok = llama2_style_tokenizer() if kind == "metaspace" else make_tokenizer_of(kind)
    pb = PromptBuilder(tok, "answer-only", "off", "\\boxed{")
    ctx = "The quick brown fox jumps over the"
    labels = label_pieces(tok, " lazy dog. ", 8, left=ctx)
    ptext, pids = pb.text(ctx), pb.ids(ctx)
    full = tok(ptext + " lazy}")["input_ids"]
    assert full[:len(pids)] == pids
    gen = full[len(pids):] + [tok.eos_token_id]
    text = pb.completion(completion_texts(tok, [pids], 1, torch.tensor([gen]), torch.ones(1, len(gen)))[0])
    run = ours()([RewardInput(completion=text, answer=extract_answer(text), label_tokens=labels, context=ctx)])[0]
    return tok, ptext, gen, labels, run


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_trl_decodes_a_prefilled_completion_after_its_prompt(kind):
    """TRL decodes completions alone (batch_decode(completion_ids, skip_special_tokens=True)); a SentencePiece
    tokenizer then drops the answer's leading space. With the tokenizer, the adapter decodes TRL's completion_ids
    after the prompt as `run` does, and scores a right answer 1 as `run` does; without it, such rows are refused."""
    tok, ptext, gen, labels, run = prefilled_completion(kind)
    assert run == 1.0
    trl_text = tok.batch_decode([gen], skip_special_tokens=True)  # what GRPOTrainer passes as `completions`
    reward = make_rpt_reward(tokenizer=tok)
    assert reward([ptext], trl_text, [labels], response_prefix=["\\boxed{"], completion_ids=[gen]) == [run]
    with pytest.raises(ValueError, match="tokenizer"):
        rpt_reward([ptext], trl_text, [labels], response_prefix=["\\boxed{"], completion_ids=[gen])


def test_verl_refuses_a_response_prefix_it_cannot_put_back_exactly():
    """verl decodes the response alone and gives the reward no ids: a prefix put back would score the
    SentencePiece case wrong ('\\boxed{lazy}' for the label ' lazy'), so it is refused."""
    tok, _, gen, labels, run = prefilled_completion("metaspace")
    solution = tok.decode(gen, skip_special_tokens=True)
    with pytest.raises(ValueError, match="response prefix"):
        compute_score("rpt", solution, json.dumps(labels), response_prefix="\\boxed{")
    with pytest.raises(ValueError, match="response prefix"):
        compute_score("rpt", solution, json.dumps(labels), {"response_prefix": "\\boxed{"})


def test_openrlhf_cuts_a_sentencepiece_chat_prompt_and_never_scores_the_prompt():
    """A Llama-2/Mistral chat prompt decodes as '<s> [INST] ...' (not '<s>[INST] ...'): the prompt is still cut
    off, and a query that does not start with the prompt gets the no-answer reward, counted, not the score of the
    prompt's own \\boxed{} instruction."""
    reward_func = load_openrlhf_reward_file()
    prompt = "<s>[INST] Predict the next token. Write it as \\boxed{ the} please. [/INST]"
    decoded = "<s> [INST] Predict the next token. Write it as \\boxed{ the} please. [/INST]"
    labels = json.dumps([" the"])
    with env(RPT_REWARD_NO_ANSWER="-1"):
        assert orl_module.response_of(decoded + " I am not sure.</s>", prompt) == " I am not sure.</s>"
        out = reward_func([decoded + " I am not sure.</s>"], [prompt], [labels])
        assert out["rewards"].tolist() == [-1.0] and out["extra_logs"]["rpt_prompt_not_found"] == 0.0
        assert reward_func([decoded + " \\boxed{ the}</s>"], [prompt], [labels])["rewards"].tolist() == [1.0]
        out = reward_func(["something else \\boxed{ the}"], [prompt], [labels])
        assert out["rewards"].tolist() == [-1.0] and out["extra_logs"]["rpt_prompt_not_found"] == 1.0


def test_openrlhf_scores_a_query_left_truncated_to_its_prompt_budget():
    """OpenRLHF keeps a prompt's last max_len - max_new_tokens ids: the query then starts inside the prompt (its BOS
    and template start gone, maybe with a token cut in two). The response after the prompt's tail is scored on its
    answer (before, the row got the no-answer reward); a query that starts with no tail of the prompt still does."""
    reward_func = load_openrlhf_reward_file()
    prompt = "<s>[INST] Continue: the quick brown fox jumps over the [/INST] \\boxed{"
    label = json.dumps({"label_tokens": [" lazy"], "rpt_reward": {"correct": 1.0, "no_answer": -1.0}})
    cases = ["<s> [INST] Continue: the quick brown fox jumps over the [/INST] \\boxed{ lazy}</s>",  # whole
             "brown fox jumps over the [/INST] \\boxed{ lazy}</s>",  # cut to its tail
             "rown fox jumps  over the[/INST] \\boxed{ lazy}</s>",  # mid-word, whitespace decoded otherwise
             "\ufffdbrown fox jumps over the [/INST] \\boxed{ lazy}</s>"]  # a UTF-8 byte token cut in two
    for query in cases:
        assert orl_module.response_of(query, prompt) == " lazy}</s>", query
    with env(RPT_RESPONSE_PREFIX="\\boxed{"):
        out = reward_func(cases + [" lazy}</s>", "[/INST] \\boxed{ lazy}</s>"], [prompt] * 6, [label] * 6)
    # nothing of the prompt, or a tail too short to tell: the no-answer reward, counted
    assert out["rewards"].tolist() == [1.0] * 4 + [-1.0, -1.0] and out["extra_logs"]["rpt_prompt_not_found"] == 2.0
    long_prompt = "<s>[INST] " + " ".join(f"word{k}" for k in range(3000)) + " [/INST] \\boxed{"
    tail = long_prompt[-2000:]
    assert orl_module.response_of(tail + " lazy}", long_prompt) == " lazy}"


def test_reward_settings_carried_in_the_label_env_overrides():
    """The export's settings (in the label for verl and OpenRLHF, the `rpt_reward` column for TRL) make each
    adapter score as the run would: values, answer format, and the think gate; env vars override them."""
    settings = {"correct": 2.0, "wrong": -0.5, "no_answer": -1.0, "answer_format": "answer_tag",
                "think_required": True}
    label = json.dumps({"label_tokens": [" a"], "rpt_reward": settings})
    cases = {"ok </think><answer> a</answer>": 2.0, "</think><answer> b</answer>": -0.5, "</think> none": -1.0,
             "<answer> a</answer>": -1.0, "</think>\\boxed{ a}": -1.0}
    for text, want in cases.items():
        assert compute_score("rpt", text, label) == want, text
        assert orl_module.response_of("P" + text, "P") == text
        assert load_openrlhf_reward_file()(["P" + text], ["P"], [label])["rewards"].tolist() == [want], text
        assert rpt_reward(["P"], [text], [[" a"]], rpt_reward=[json.dumps(settings)]) == [want], text
    with env(RPT_REWARD_CORRECT="3", RPT_ANSWER_FORMAT="boxed"):
        assert compute_score("rpt", "</think>\\boxed{ a}", label) == 3.0
    assert compute_score("rpt", "\\boxed{ a}", json.dumps([" a"])) == 1.0  # a plain list: the paper's values


@pytest.mark.parametrize("variant", ["metaspace-first", "prepend-normalizer"])
def test_openrlhf_prompt_lead_gives_runs_ids_for_sentencepiece_bos_tokenizers(variant):
    """Llama-2/Mistral base policies (BOS added, no chat template), both ways their tokenizer.json writes the
    leading '▁' (a Metaspace pre-tokenizer that prepends at the text's start, or a Prepend normalizer): OpenRLHF's
    ids of lead + prompt text, without special tokens, are `run`'s."""
    from tokenizers import normalizers, processors

    from rpt_train.export import openrlhf_prompt_lead
    from rpt_train.templates import PromptBuilder

    tok = llama2_style_tokenizer()
    if variant == "prepend-normalizer":  # as Llama-2's own tokenizer.json
        tok._tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                          normalizers.Replace(" ", "\u2581")])
        tok._tokenizer.pre_tokenizer = None
    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    prompts = PromptBuilder(tok, "v0", "auto")
    samples = [SimpleNamespace(context=c, key=str(i), doc_id="d") for i, c in
               enumerate(["The quick brown fox", " jumps over", "lazy dog. The"])]
    lead = openrlhf_prompt_lead(tok, prompts, samples)
    assert lead == {"metaspace-first": "<s> ", "prepend-normalizer": "<s>"}[variant]
    for s in samples:
        ids = tok(lead + prompts.text(s.context), add_special_tokens=False)["input_ids"]
        assert ids == prompts.ids(s.context) and ids[0] == bos
