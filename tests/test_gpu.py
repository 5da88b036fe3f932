"""CUDA-only checks without a CPU twin (bench/gpu.sh runs every `gpu`-marked test): a one-rank FSDP2 step over NCCL
equals the plain step, and the tagger's head gives float32 logits from bf16 inputs (issue 32.6) with statistics at
float64-reference accuracy. Skipped without CUDA (tests/conftest.py). Everything that touches triton or CUDA is
imported inside the tests: this module is collected on CPU before tests/test_kernel.py, which must import triton
first (under TRITON_INTERPRET=1). The kernel against its float64 reference at V = 151,936 and 256,000 is in
tests/test_kernel.py, the compiled static-cache rollouts against eager in tests/test_train_rollout.py."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture
def nccl_group():
    """A one-rank process group, CPU tensors on gloo and CUDA tensors on NCCL (what rpt_train.distributed starts
    under torchrun on GPUs); torn down after the test."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_one_rank_nccl_fsdp2_step_equals_the_plain_step(tiny_llama, nccl_group):
    """The same rollouts and rewards through `update_policy`: FSDP2 over NCCL (one rank, float32) gives the plain
    model's loss, statistics and weights after the AdamW step."""
    from rpt_train import distributed
    from rpt_train.collect import Groups
    from rpt_train.config import TrainConfig
    from rpt_train.policy import load_policy
    from rpt_train.rollout import HFRollout, SamplingParams
    from rpt_train.update import update_policy

    assert "nccl" in str(nccl_group.get_backend()) and distributed.world_size() == 1
    plain = load_policy(str(tiny_llama), device="cuda", dtype="float32")
    tok = plain.tokenizer
    start = {n: p.detach().clone() for n, p in plain.model.named_parameters()}
    prompts = [tok("The quick brown fox")["input_ids"], tok("x = 2 x_n + 1 so")["input_ids"]]
    torch.manual_seed(0)
    rollouts = HFRollout(plain.model, tok, [tok.eos_token_id]).generate(
        prompts, SamplingParams(n=4, max_new_tokens=6, temperature=1.0))
    batch = Groups(samples=[None, None], rollouts=rollouts, rewards=torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2]),
                   answers=[None] * 8)
    cfg = TrainConfig(shards="x", group_size=4, max_new_tokens=6, lr=1e-3, micro_batch_size=2, device="cuda",
                      dtype="float32", bf16=False, beta=0.0)
    sharded = distributed.shard_model(load_policy(str(tiny_llama), device="cuda", dtype="float32").model, "cuda")
    assert distributed.is_sharded(sharded)
    results = []
    for model in (plain.model, sharded):
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        stats = update_policy(cfg, model, None, optimizer, copy.deepcopy(batch))
        weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                   for n, p in model.named_parameters()}
        results.append((stats, weights))
    (a, wa), (b, wb) = results
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] if not isinstance(a[k], float) else a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    assert wa.keys() == wb.keys() == start.keys()
    assert max(float((wa[n] - start[n]).abs().max()) for n in wa) > 1e-4  # the step moved the weights
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-5, atol=1e-6, msg=n)


def _stats64(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and target log-prob (nats) of float64 logits."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1), logp.gather(1, targets.view(-1, 1)).squeeze(1)


def test_head_gives_float32_logits_from_bf16_inputs():
    """Issue 32.6 on CUDA: `logits_fp32` of bf16 hidden states and head accumulates and writes float32 (into the
    given buffer), within fp32 rounding of the float64 product, far inside the bf16 rounding of the logits."""
    from rpt_common.heads import logits_fp32

    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 256, 1536, 151936
    hidden = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, d, device="cuda", generator=g) * 0.1).to(torch.bfloat16)  # logits of std ~4
    want = hidden.double() @ weight.double().t()
    buf = torch.empty(n, v, dtype=torch.float32, device="cuda")
    got = logits_fp32(hidden, weight, out=buf)
    assert got.dtype == torch.float32 and got.data_ptr() == buf.data_ptr()
    err = float((got.double() - want).abs().max())
    bf16_err = float((want.to(torch.bfloat16).double() - want).abs().max())
    assert err < 1e-3 * float(want.abs().max()) and err * 8 < bf16_err, (err, bf16_err)
    assert logits_fp32(hidden, weight).dtype == torch.float32


def test_head_token_stats_in_bf16_match_the_float64_reference():
    """The tagger's chunked head + fused kernel on bf16 inputs: entropy and target log-prob within 2e-3 nats of
    float64 statistics of the float64 logits, closer than statistics of bf16-rounded logits get."""
    from rpt_data.entropy import head_token_stats

    g = torch.Generator(device="cuda").manual_seed(1)
    n, d, v = 512, 1536, 151936
    hidden = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, d, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    st = head_token_stats(hidden, weight, targets, chunk_rows=128)
    logits = hidden.double() @ weight.double().t()
    ent, tlp = _stats64(logits, targets)
    ent_bf16, tlp_bf16 = _stats64(logits.to(torch.bfloat16), targets)
    err = max(float((st.entropy.double() - ent).abs().max()), float((st.target_logprob.double() - tlp).abs().max()))
    err_bf16 = max(float((ent_bf16 - ent).abs().max()), float((tlp_bf16 - tlp).abs().max()))
    assert err < 2e-3 and err < err_bf16, (err, err_bf16)
    assert (logits.gather(1, st.argmax.view(-1, 1)).squeeze(1) >= logits.amax(-1) - 1e-3).all()  # up to near-ties
