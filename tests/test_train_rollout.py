"""HF rollouts: shapes, group order, EOS masks, and sampler log-probs equal to the training forward's."""
import pytest
import torch

from rpt_common.models import load_causal_lm
from rpt_train.logprobs import forward_logprobs
from rpt_train.policy import eos_ids, load_policy
from rpt_train.rollout import HFRollout, SamplingParams, completion_mask, concat_batches


@pytest.fixture(scope="module")
def policy(tiny_llama):
    return load_policy(str(tiny_llama), device="cpu")


def prompts(tok):
    return [tok("The quick brown fox")["input_ids"], tok("x = 2 x_n + 1 so")["input_ids"][:3]]


def test_completion_mask_stops_after_first_eos():
    c = torch.tensor([[5, 9, 7], [9, 1, 9], [1, 2, 3]])
    assert completion_mask(c, [9]).tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert completion_mask(c, []).tolist() == [[1, 1, 1]] * 3


def test_hf_rollout_shapes_groups_and_logprobs(policy):
    tok, model = policy.tokenizer, policy.model
    engine = HFRollout(model, tok, eos_ids(policy))
    torch.manual_seed(0)
    b = engine.generate(prompts(tok), SamplingParams(n=3, max_new_tokens=6, temperature=0.8))
    assert b.prompt_ids.shape[0] == b.completion_ids.shape[0] == len(b.texts) == 6
    assert b.completion_ids.shape[1] <= 6
    assert (b.prompt_ids[:3] == b.prompt_ids[0]).all() and (b.prompt_ids[3:] == b.prompt_ids[3]).all()
    assert b.prompt_mask[3].sum() == 3 and b.prompt_mask[3, 0] == 0  # left padding
    lp, _ = forward_logprobs(model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, 0.8)
    m = b.completion_mask.bool()
    assert torch.allclose(lp[m], b.logprobs[m], atol=1e-4)
    torch.manual_seed(0)
    again = engine.generate(prompts(tok), SamplingParams(n=3, max_new_tokens=6, temperature=0.8))
    assert torch.equal(again.completion_ids, b.completion_ids)


def test_hf_rollout_stops_at_eos_and_chunks(policy):
    tok, model = policy.tokenizer, policy.model
    every_token_ends = HFRollout(model, tok, list(range(len(tok))), batch_size=2)
    b = every_token_ends.generate(prompts(tok), SamplingParams(n=2, max_new_tokens=5, temperature=1.0))
    assert b.lengths.tolist() == [1, 1, 1, 1] and b.completion_ids.shape == (4, 1)
    greedy = HFRollout(model, tok, eos_ids(policy)).generate(prompts(tok), SamplingParams(n=1, max_new_tokens=4,
                                                                                          greedy=True))
    both = concat_batches([greedy, b], pad=tok.pad_token_id)
    assert both.completion_ids.shape == (6, 4) and both.texts[2:] == b.texts
    assert both.completion_mask[2:, 1:].sum() == 0


def test_policy_checks(tiny_llama, tmp_path):
    import shutil

    from rpt_common.errors import UserError

    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    loaded = load_causal_lm(str(d), device="cpu")
    loaded.tokenizer.add_tokens([f"<extra{i}>" for i in range(40)])
    loaded.tokenizer.save_pretrained(d)
    with pytest.raises(UserError, match="does not belong to this model"):
        load_policy(str(d), device="cpu")


@pytest.mark.parametrize("packed,static", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_sliding"])
def test_hf_rollout_paths_agree(arch, packed, static, request):
    """Per-prompt (packed) or batched prefill, dynamic or static cache: the same greedy tokens, and sampler
    log-probs equal to the training forward's (sliding-window models fall back to batched + dynamic)."""
    policy = load_policy(str(request.getfixturevalue(arch)), device="cpu")
    tok, model = policy.tokenizer, policy.model
    ps = prompts(tok) + [tok("hello there")["input_ids"]]
    params = SamplingParams(n=2, max_new_tokens=7, greedy=True)
    ref = HFRollout(model, tok, eos_ids(policy), packed_prefill=False, static_cache=False).generate(ps, params)
    b = HFRollout(model, tok, eos_ids(policy), packed_prefill=packed, static_cache=static, cache_bucket=8).generate(
        ps, params)
    assert torch.equal(b.completion_ids, ref.completion_ids) and torch.equal(b.completion_mask, ref.completion_mask)
    lp, _ = forward_logprobs(model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, 1.0)
    m = b.completion_mask.bool()
    assert torch.allclose(lp[m], b.logprobs[m], atol=1e-4)


def test_hf_rollout_drops_finished_rows(policy):
    """Rows that hit EOS leave the decoding batch; the others go on with the right cache rows and log-probs."""
    tok, model = policy.tokenizer, policy.model
    engine = HFRollout(model, tok, list(range(0, len(tok), 3)), static_cache=False)  # a third of the vocab ends
    torch.manual_seed(1)
    b = engine.generate(prompts(tok), SamplingParams(n=4, max_new_tokens=12, temperature=1.0))
    assert b.lengths.min() < b.lengths.max()
    lp, _ = forward_logprobs(model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, 1.0)
    m = b.completion_mask.bool()
    assert torch.allclose(lp[m], b.logprobs[m], atol=1e-4)


@pytest.mark.gpu
def test_hf_rollout_compiled_static_cuda(tiny_llama):
    """CUDA, static cache asked for: torch.compile (CUDA graphs) by default. Sampler log-probs equal the training
    forward's, greedy tokens equal the eager dynamic path's, and a second call (graph replay) gives the same tokens."""
    policy = load_policy(str(tiny_llama), device="cuda")
    tok, model = policy.tokenizer, policy.model
    params = SamplingParams(n=3, max_new_tokens=10, greedy=True)
    eager = HFRollout(model, tok, eos_ids(policy), static_cache=False, compile=False).generate(prompts(tok), params)
    assert not HFRollout(model, tok, eos_ids(policy))._use_static(torch.device("cuda"))  # dynamic by default
    engine = HFRollout(model, tok, eos_ids(policy), static_cache=True)
    assert engine._use_static(torch.device("cuda")) and engine._decode_fn(torch.device("cuda")) is not None
    first, again = engine.generate(prompts(tok), params), engine.generate(prompts(tok), params)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.completion_ids, eager.completion_ids)
    lp, _ = forward_logprobs(model, first.prompt_ids, first.prompt_mask, first.completion_ids, first.completion_mask, 1.0)
    m = first.completion_mask.bool()
    assert torch.allclose(lp[m], first.logprobs[m], atol=1e-3)


def test_static_cache_is_reused_padded_and_refused_when_too_large(policy):
    """A static cache that fits is kept and reused by a smaller call (rows padded with finished copies), with the
    tokens of an unpadded dynamic run; one larger than `memory_limit` is refused before it is allocated."""
    from rpt_common.errors import UserError

    tok, model = policy.tokenizer, policy.model
    assert not HFRollout(model, tok, eos_ids(policy))._use_static(torch.device("cpu"))  # dynamic by default
    engine = HFRollout(model, tok, eos_ids(policy), static_cache=True, cache_bucket=8)
    params = SamplingParams(n=2, max_new_tokens=6, greedy=True)
    engine.generate(prompts(tok) + [tok("hello there")["input_ids"]], params)  # 6 rows
    kept = engine._static
    assert kept["rows"] == 6 and kept["length"] % 8 == 0
    small = engine.generate(prompts(tok)[:1], params)  # 2 rows: padded to the kept cache's 6
    assert engine._static is kept and small.completion_ids.shape[0] == 2
    dynamic = HFRollout(model, tok, eos_ids(policy)).generate(prompts(tok)[:1], params)
    assert torch.equal(small.completion_ids, dynamic.completion_ids)
    m = small.completion_mask.bool()
    lp, _ = forward_logprobs(model, small.prompt_ids, small.prompt_mask, small.completion_ids, small.completion_mask, 1.0)
    assert torch.allclose(lp[m], small.logprobs[m], atol=1e-4)
    tight = HFRollout(model, tok, eos_ids(policy), static_cache=True, memory_limit=1024)
    with pytest.raises(UserError, match="static KV cache for 4 sequences"):
        tight.generate(prompts(tok), params)
