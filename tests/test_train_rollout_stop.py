"""HFRollout's `SamplingParams.stop_text` (rlp's rollouts stop at `</think>`): a row that writes the stop text ends
at the token that completes it (kept), as at EOS, with exactly the tokens, log-probs and text the update trains
without the stop (rlp.thought_rows); a row that never writes it decodes to the budget; per tokenizer kind, `</think>`
several plain tokens or one special token, on the dynamic, static (delayed check) and lockstep paths. Without
stop_text nothing changes. The rlp objective asks for the stop and its step metrics count the shorter rows."""
import copy

import pytest
import torch
from shard_fixtures import train_shards, tiny_tok  # noqa: F401

from rpt_train import objectives
from rpt_train.config import TrainConfig
from rpt_train.reward import THINK_END
from rpt_train.rlp import thought_rows
from rpt_train.rollout import HFRollout, SamplingParams
from rpt_train.samples import TrainSamples
from rpt_train.trainer import collect

BUDGET = 24


def tiny_lm(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


def kind_tokenizer(kind: str, tags: str):
    """A tokenizer of `kind` (tests/data_helpers.py) with a pad token; `</think>` plain text or one special token."""
    from data_helpers import make_tokenizer_of

    tok = copy.deepcopy(make_tokenizer_of(kind))
    tok.pad_token = tok.eos_token
    if tags == "special":
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    return tok


def chains(tok):
    """(head, successor map): a thought ' a b</think>' (distinct tokens) then 'm>m>m>...' forever; a row started
    on 'm' writes 'm>m>...' (tokens that can end `</think>`, tested at every other step, never closing)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, m, gt = enc(" a b" + THINK_END), enc(" hm")[-1], tok.convert_tokens_to_ids(">")
    assert len(set(head)) == len(head) and m not in head and gt not in head[:-1], tok.convert_ids_to_tokens(head)
    succ = dict(zip(head, head[1:])) | {head[-1]: m, m: gt, gt: m}
    return head, succ, m


def scripted(model, first: dict, succ: dict, default: int):
    """Forced sampling: the model's logits are replaced by (near) one-hot ones, the next token a function of the
    last input token (a prefill: `first[last prompt token]`, else `default`; a decode step: `succ`)."""
    vocab = model.config.vocab_size

    def hook(module, args, kwargs, out):
        ids = kwargs["input_ids"]
        last = ids[:, -1].tolist()
        nxt = [first.get(t, default) if ids.shape[1] > 1 else succ.get(t, default) for t in last]
        logits = torch.full((ids.shape[0], 1, vocab), -30.0, dtype=out.logits.dtype)
        logits[torch.arange(len(nxt)), 0, torch.tensor(nxt)] = 30.0
        out.logits = logits
        return out

    return model.register_forward_hook(hook, with_kwargs=True)


PATHS = {  # HFRollout options, greedy, lockstep with another rank that never finishes
    "dynamic": ({"static_cache": False}, True, False),
    "static-delayed-check": ({"static_cache": True, "cache_bucket": 8, "check_every": 4}, False, False),
    "lockstep": ({"static_cache": False, "check_every": 2}, False, True),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("tags", ["text", "special"])
@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_a_row_stops_at_the_token_that_completes_the_stop_text(kind, tags, path, monkeypatch):
    tok = kind_tokenizer(kind, tags)
    head, succ, m = chains(tok)
    model = tiny_lm(len(tok))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("The quick brown fox<think>"), enc("Hello there<think>")[:-1] + enc(" hm")[:1]]
    assert prompts[0][-1] != prompts[1][-1]
    scripted(model, {prompts[0][-1]: head[0], prompts[1][-1]: m}, succ, m)
    opts, greedy, lockstep = PATHS[path]
    if lockstep:  # another rank still decoding: this one steps on (finished rows included) to the budget
        monkeypatch.setattr("rpt_train.distributed.all_true", lambda flag: False)
    engine = HFRollout(model, tok, [tok.eos_token_id], lockstep=lockstep, **opts)
    n, L = 2, len(head)
    params = SamplingParams(n=n, max_new_tokens=BUDGET, greedy=greedy)
    torch.manual_seed(0)
    plain = engine.generate(prompts, params)
    torch.manual_seed(0)
    stopped = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=BUDGET, greedy=greedy, stop_text=THINK_END))
    assert plain.lengths.tolist() == [BUDGET] * 2 * n  # without the stop every row runs to the budget
    assert stopped.lengths.tolist() == [L] * n + [BUDGET] * n  # j tokens of thought + the close's, none after
    assert stopped.completion_ids.shape[1] == BUDGET
    assert stopped.completion_ids[:n, :L].tolist() == [head] * n
    assert (stopped.completion_ids[:n, L:] == tok.pad_token_id).all()
    assert (stopped.logprobs[:n, L:] == 0).all() and (stopped.entropy[:n, L:] == 0).all()
    assert all(t.endswith(THINK_END) and t.count(THINK_END) == 1 for t in stopped.texts[:n])
    assert all(THINK_END not in t and ">" in t for t in stopped.texts[n:])  # '>' seen, never closed
    assert stopped.texts[n:] == plain.texts[n:]
    # exactly what rlp's update trains of the unstopped rollout: tokens, mask, log-probs (and the text it scores)
    trained = thought_rows(tok, plain)
    assert torch.equal(trained.completion_mask, stopped.completion_mask)
    keep = stopped.completion_mask.bool()
    assert torch.equal(stopped.completion_ids[keep], plain.completion_ids[keep])
    assert torch.allclose(stopped.logprobs[keep], plain.logprobs[keep])
    assert all(s == p.split(THINK_END)[0] + THINK_END for s, p in zip(stopped.texts[:n], plain.texts[:n]))


def test_without_a_stop_text_rollouts_are_unchanged(tiny_llama):
    """A seeded sampled run of a random model: stop_text None and a stop text no row writes give the same
    completions, log-probs and texts (the stop test draws no random numbers and changes no row)."""
    from rpt_train.policy import eos_ids, load_policy

    policy = load_policy(str(tiny_llama), device="cpu")
    tok = policy.tokenizer
    engine = HFRollout(policy.model, tok, eos_ids(policy))
    ps = [tok("The quick brown fox<think>")["input_ids"], tok("x = 2 x_n + 1 so")["input_ids"]]
    runs = []
    for stop in (None, THINK_END, None):
        torch.manual_seed(3)
        runs.append(engine.generate(ps, SamplingParams(n=3, max_new_tokens=12, temperature=1.0, stop_text=stop)))
    assert not any(THINK_END in t for t in runs[0].texts)
    for b in runs[1:]:
        assert torch.equal(b.completion_ids, runs[0].completion_ids) and b.texts == runs[0].texts
        assert torch.equal(b.completion_mask, runs[0].completion_mask) and torch.equal(b.logprobs, runs[0].logprobs)


def test_rlp_asks_for_the_stop_and_its_metrics_count_the_shorter_rows(tiny_tok, train_shards):
    """Objective.begin_step sets stop_text for rlp only (rpt: its answer follows `</think>`); one collect round of
    rlp through HFRollout (every thought closes after len(head) tokens): completion_length and rollout_tokens
    count the stopped rows, not the budget."""
    tok = tiny_tok
    head, succ, m = chains(tok)
    model = tiny_lm(len(tok))
    scripted(model, {}, succ, head[0])
    engine = HFRollout(model, tok, [tok.eos_token_id])
    rlp = TrainConfig(shards=str(train_shards), bucket="all", batch_prompts=2, group_size=2, objective="rlp",
                      think_budget=BUDGET, dynamic_sampling=False)
    rpt = TrainConfig(shards=str(train_shards), bucket="all", think_budget=BUDGET, template="think")
    for cfg, stop in ((rlp, THINK_END), (rpt, None)):
        data = TrainSamples(cfg, tok)
        params = objectives.Objective(cfg, tok).begin_step(1, data, SamplingParams(n=cfg.group_size))
        assert params.stop_text == stop and params.max_new_tokens == objectives.new_tokens(cfg, 1)
    objective = objectives.Objective(rlp, tok)
    stats = {}
    for stop in (None, THINK_END):
        params = SamplingParams(n=2, max_new_tokens=BUDGET, stop_text=stop)
        batch, _, stats[stop] = collect(rlp, TrainSamples(rlp, tok), objective.prompts(None), engine,
                                        lambda items: [float(i % 2) for i in range(len(items))], params)
        assert torch.equal(objective.trained(batch).rollouts.completion_mask.sum(1), torch.full((4,), len(head)))
    assert stats[THINK_END]["completion_length"] == len(head) and stats[THINK_END]["rollout_tokens"] == 4 * len(head)
    assert stats[None]["completion_length"] == BUDGET and stats[None]["rollout_tokens"] == 4 * BUDGET


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_the_stop_ends_the_row_that_wrote_it_wherever_it_sits(kind):
    """_stop_rows maps a pending row back to its decoding-batch row: with the closing row after one still thinking
    (as in most groups of G), the closing row is done and the thinking one is not (it was the other way round)."""
    tok = kind_tokenizer(kind, "plain")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    engine = HFRollout.__new__(HFRollout)
    engine.tokenizer, engine._stop_key, engine._stop_ids, engine._stop_cpu = tok, None, None, None
    engine._stop_candidates(THINK_END, len(tok), torch.device("cpu"))
    close = enc(" a b" + THINK_END)
    other = (enc(" a b c d e f g h i j k l m n o p") * 4)[:len(close)]
    for order in ((other, close), (close, other), (other, other, close)):
        n = len(order)
        tokens = torch.tensor(order)
        closing = [j for j, row in enumerate(order) if row is close]
        done, stop_len = torch.zeros(n, dtype=torch.bool), torch.full((n,), 99)
        pending = torch.tensor([row is close for row in order])
        engine._stop_rows(THINK_END, [enc("x<think>")], n, tokens, torch.arange(n), pending, done, stop_len, 0,
                          len(close))
        assert done.tolist() == [j in closing for j in range(n)]
        assert stop_len.tolist() == [len(close) if j in closing else 99 for j in range(n)]


def test_the_stop_candidates_accept_a_tokenizer_whose_tokens_are_bytes(monkeypatch):
    """A tiktoken-based tokenizer's convert_ids_to_tokens gives bytes: the candidate mask is the same as from the
    strings (it raised TypeError at the first rlp step)."""
    tok = kind_tokenizer("bytelevel", "plain")

    def mask():
        engine = HFRollout.__new__(HFRollout)
        engine.tokenizer, engine._stop_key, engine._stop_ids, engine._stop_cpu = tok, None, None, None
        return engine._stop_candidates(THINK_END, len(tok), torch.device("cpu")).tolist()
    want = mask()
    real = tok.convert_ids_to_tokens
    monkeypatch.setattr(tok, "convert_ids_to_tokens", lambda ids: [t.encode() for t in real(ids)])
    assert mask() == want and any(want)
