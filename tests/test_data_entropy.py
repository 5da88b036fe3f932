"""The pure-torch stats path against a float64 recomputation (the Triton kernel has its own tests)."""
import math

import pytest
import torch

from rpt_data.entropy import head_token_stats, token_stats, token_stats_torch


def ref64(logits: torch.Tensor, targets: torch.Tensor | None, k: int):
    x = logits.double()
    rows = []
    for i, r in enumerate(x):
        if torch.isnan(r).any():
            rows.append((math.nan, math.nan, math.nan, -1))
            continue
        p = torch.softmax(r, 0)
        ent = -(p[p > 0] * p[p > 0].log()).sum().item()
        top = torch.topk(r, min(k, r.numel())).values
        q = torch.softmax(top, 0)
        tent = -(q[q > 0] * q[q > 0].log()).sum().item()
        tlp = (r[targets[i]] - torch.logsumexp(r, 0)).item() if targets is not None else math.nan
        rows.append((ent, tent, tlp, int(r.argmax())))
    return rows


def check(st, rows, tol):
    for i, (e, t, lp, a) in enumerate(rows):
        for got, want in ((st.entropy[i], e), (st.topk_entropy[i], t), (st.target_logprob[i], lp)):
            if math.isnan(want):
                assert math.isnan(float(got)), i
            else:
                assert float(got) == pytest.approx(want, abs=tol, rel=tol), i
        assert int(st.argmax[i]) == a


@pytest.mark.parametrize("v,k", [(1, 16), (7, 4), (100, 16), (1001, 64)])
def test_token_stats_matches_float64(v, k):
    torch.manual_seed(v)
    logits = torch.randn(6, v) * 3
    targets = torch.randint(0, v, (6,))
    st = token_stats(logits, targets, top_k=k)
    assert st.entropy.dtype == torch.float32 and st.argmax.dtype == torch.int64
    check(st, ref64(logits, targets, k), 1e-4)


def test_masked_and_nan_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[0, 10:] = -math.inf  # masked vocabulary
    logits[2, 3] = math.nan  # only this row becomes NaN
    targets = torch.tensor([1, 2, 3, 4])
    st = token_stats_torch(logits, targets, 16)
    check(st, ref64(logits, targets, 16), 1e-4)
    assert math.isnan(st.entropy[2]) and st.argmax[2] == -1
    assert not math.isnan(st.entropy[3])


def test_no_targets_gives_nan_logprob():
    st = token_stats(torch.randn(3, 20))
    assert torch.isnan(st.target_logprob).all()


def test_bf16_input_accumulates_in_fp32():
    logits = (torch.randn(5, 300) * 4).bfloat16()
    st = token_stats(logits, torch.zeros(5, dtype=torch.long))
    check(st, ref64(logits.float(), torch.zeros(5, dtype=torch.long), 16), 1e-4)


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_head_token_stats_equals_full_logits(chunk_rows):
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(10, 8), torch.randn(37, 8), torch.randn(37)
    targets = torch.randint(0, 37, (10,))
    logits = hidden.double() @ weight.double().T + bias.double()
    capped = 5.0 * torch.tanh(logits / 5.0)
    st = head_token_stats(hidden, weight, targets, top_k=8, chunk_rows=chunk_rows, bias=bias, softcap=5.0)
    check(st, ref64(capped, targets, 8), 1e-4)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        token_stats(torch.randn(3))
    with pytest.raises(ValueError):
        token_stats(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
