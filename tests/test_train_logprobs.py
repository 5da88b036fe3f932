"""The chunked, checkpointed log-prob/entropy path (trunk, then the head on the completion tokens only) against
the model's own full [B, C, V] log-softmax, in float64: values, entropy and gradients at odd chunk sizes, tied
and untied heads, with and without temperature; 0 where the completion is padding."""
import pytest
import torch

from rpt_train.logprobs import chunk_logprobs, forward_logprobs, forward_logprobs_full
from rpt_train.policy import load_policy


def batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab, (3, 5), generator=g)
    pmask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    comp = torch.randint(1, vocab, (3, 4), generator=g)
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    return prompt, pmask, comp, cmask


def real(ref, inputs):
    """The reference with the padded completion positions set to 0, as forward_logprobs returns them."""
    return ref * inputs[3] if ref is not None else None


def grads(model, logp, weight):
    model.zero_grad(set_to_none=True)
    (logp * weight).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (5, 0.8), (7, 1.3), (4096, 0.8)])
def test_chunked_equals_full_in_float64(arch, chunk, temperature, request):
    model = load_policy(str(request.getfixturevalue(arch)), device="cpu").model.double()
    inputs = batch(model.config.vocab_size)
    weight = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, ref_ent = (real(x, inputs) for x in forward_logprobs_full(model, *inputs, temperature, with_entropy=True))
    ref_grads = grads(model, ref, weight)
    lp, ent = forward_logprobs(model, *inputs, temperature, with_entropy=True, chunk_tokens=chunk)
    assert lp.dtype == torch.float64 and lp.shape == (3, 4)
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
    assert not ent.requires_grad
    new_grads = grads(model, lp, weight)
    assert new_grads.keys() == ref_grads.keys() and model.get_output_embeddings().weight.grad is not None
    for name in ref_grads:
        torch.testing.assert_close(new_grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    assert "forward" not in vars(model)  # the model's own forward is given back


def test_no_grad_and_without_entropy(tiny_llama):
    model = load_policy(str(tiny_llama), device="cpu").model.double()
    inputs = batch(model.config.vocab_size, seed=3)
    with torch.no_grad():
        lp, ent = forward_logprobs(model, *inputs, 1.0, chunk_tokens=2)
        ref = real(forward_logprobs_full(model, *inputs, 1.0)[0], inputs)
    assert ent is None and not lp.requires_grad
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)


def test_chunk_logprobs_softcap_and_empty():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, dtype=torch.float64)
    h, t = torch.randn(9, 6, dtype=torch.float64, generator=g), torch.randint(0, 11, (9,), generator=g)
    lp, ent = chunk_logprobs(head, h, t, 0.7, True, chunk_tokens=4, softcap=3.0)
    logp = torch.log_softmax(torch.tanh(head(h) / 3.0) * 3.0 / 0.7, -1)
    torch.testing.assert_close(lp, logp.gather(-1, t[:, None])[:, 0])
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1))
    none, none_ent = chunk_logprobs(head, h[:0], t[:0], 1.0, True, chunk_tokens=4)
    assert none.shape == (0,) and none_ent.shape == (0,)


def test_with_the_models_gradient_checkpointing(tiny_llama):
    """Our per-chunk checkpoint nested in HF's per-layer one: the same values and gradients."""
    model = load_policy(str(tiny_llama), device="cpu").model.double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inputs = batch(model.config.vocab_size, seed=5)
    weight = torch.ones(3, 4, dtype=torch.float64)
    ref = real(forward_logprobs_full(model, *inputs, 0.9)[0], inputs)
    ref_grads = grads(model, ref, weight)
    lp, _ = forward_logprobs(model, *inputs, 0.9, chunk_tokens=3)
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    for name, g in grads(model, lp, weight).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


# Gemma-2 in float32: its eager attention gives NaN on left-padded rows once the model is cast to float64
@pytest.mark.parametrize("arch,dtype,tol", [("granite", torch.float64, 1e-12), ("cohere", torch.float64, 1e-12),
                                            ("gemma2", torch.float32, 1e-5)])
def test_chunked_equals_full_for_scaled_and_capped_heads(arch, dtype, tol, tmp_path):
    """Families whose forward scales (Granite, Cohere) or soft-caps (Gemma-2) the head's output: the chunked path
    applies the same head spec as the model's own forward, values and gradients."""
    from tiny import make_model_dir

    model = load_policy(str(make_model_dir(tmp_path / arch, arch=arch)), device="cpu").model.to(dtype)
    inputs = batch(model.config.vocab_size, seed=7)
    weight = torch.randn(3, 4, dtype=dtype, generator=torch.Generator().manual_seed(2))
    ref, ref_ent = (real(x, inputs) for x in forward_logprobs_full(model, *inputs, 0.8, with_entropy=True))
    ref_grads = grads(model, ref, weight)
    lp, ent = forward_logprobs(model, *inputs, 0.8, with_entropy=True, chunk_tokens=5)
    torch.testing.assert_close(lp, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(ent, ref_ent, rtol=tol, atol=tol)
    for name, g in grads(model, lp, weight).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=100 * tol, atol=tol, msg=name)
