"""Issue 32: the device never waits on CPU work (read ahead, write behind, one copy per batch, batches sorted across
a look-ahead), float32 logits into the stats, and a padded head's extra rows never scored."""
import hashlib
import json
import threading

import numpy as np
import pytest
import torch

from data_helpers import SENTENCES, read_rows, records, write_jsonl
from rpt_data.config import TagConfig
from rpt_data.merge import merge_out
from rpt_data.pipeline import run_tag
from rpt_data.proxy import constant_stats
from test_data_entropy import ref64
from test_data_multirank import corpus

WAIT = 20.0  # seconds an event may take to come: only reached when the overlap is missing (the test then fails)


def shard_bytes(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("**/shard-*.parquet"))}


def records_of(out):
    """The completion records, without what differs between two runs by design (their --out)."""
    def strip(m):
        return {**m, "config": {k: v for k, v in m["config"].items() if k != "out"}}
    return {p.name: strip(json.loads(p.read_text())) for p in sorted(out.glob("*.json"))}


@pytest.mark.parametrize("world,case", [(1, "continuous-files"), (2, "structured-stripes"),
                                        (2, "continuous-windows"), (2, "structured-files")])
def test_overlap_on_writes_the_bytes_of_the_run_in_line(tmp_path, tiny_llama, monkeypatch, world, case):
    """Threads only move work in time: shards, rejects and records are byte for byte those of the loop run in
    line, for 1 and 2 ranks, with pools of 2 shards (several pools, so read-ahead and write-behind both act)."""
    import rpt_data.pipeline as pipeline
    import rpt_data.pools as pools

    inputs, kw = corpus(tmp_path / "in", case)
    opts = dict(inputs=inputs, model=str(tiny_llama), window=16, context_prefix=4, shard_rows=2, batch_tokens=40,
                progress=False, world_size=world, **kw)
    monkeypatch.setattr(pools, "LOOKAHEAD_TOKENS", 2 * 2 * 16)
    outs = {}
    for overlap in (False, True):
        monkeypatch.setattr(pipeline, "OVERLAP", overlap)
        out = tmp_path / f"overlap-{overlap}"
        for rank in range(world):
            run_tag(TagConfig(out=str(out), rank=rank, **opts))
        if world > 1:
            merge_out(str(out))
        outs[overlap] = out
    off, on = outs[False], outs[True]
    assert len(shard_bytes(off)) > 4 and shard_bytes(on) == shard_bytes(off)
    assert records_of(on) == records_of(off)
    assert (on / "rejects.jsonl").read_text() == (off / "rejects.jsonl").read_text()


class StandIn:
    """A proxy that takes no time: every scored position gets 1 nat; `hook(windows)` runs before each batch."""

    bos, offset = None, 0

    def __init__(self, hook=None):
        self.hook = hook
        self.batches: list[int] = []  # real tokens per batch

    def precision(self) -> dict:
        return {"device": "cpu", "dtype": "float32", "tf32": False}

    def score_batch(self, windows):
        if self.hook is not None:
            self.hook(windows)
        self.batches.append(sum(len(w.token_ids) for w in windows))
        return constant_stats(windows)


def test_reading_runs_ahead_of_the_scorer_and_writing_behind_it(tmp_path, tiny_llama, monkeypatch):
    """While the first pool is scored, the next one is already read and windowed; while the first shard is being
    written, the scorer is already at the next pool. In line, neither can happen (each waits for the other)."""
    import rpt_data.pipeline as pipeline
    import rpt_data.pools as pools

    monkeypatch.setattr(pools, "LOOKAHEAD_TOKENS", 2 * 16)  # one shard of 2 windows per pool
    made = {"n": 0}
    read_next = threading.Event()  # the windows of pool 2 exist
    scored_next = threading.Event()  # a window of shard >= 1 reached the scorer
    seen = {"ahead": False, "behind": False}
    real_windows, real_write = pipeline.windows_from_pieces, pipeline.write_shard

    def counting_windows(*a, **k):
        for w in real_windows(*a, **k):
            made["n"] += 1
            if made["n"] >= 4:
                read_next.set()
            yield w

    def hook(windows):
        if {w.doc_id for w in windows} <= {"r0", "r1"}:  # pool 1 (shard 0)
            seen["ahead"] = read_next.wait(WAIT)
        else:
            scored_next.set()

    def slow_write(path, table, *rest):
        if path.name.endswith("00000.parquet"):
            seen["behind"] = scored_next.wait(WAIT)
        return real_write(path, table, *rest)

    monkeypatch.setattr(pipeline, "windows_from_pieces", counting_windows)
    monkeypatch.setattr(pipeline, "write_shard", slow_write)
    monkeypatch.setattr(pipeline, "build_proxy", lambda lm, **kw: StandIn(hook))
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": SENTENCES[i % 5][:30]} for i in range(8)])
    manifest = run_tag(TagConfig(inputs=[str(src)], model=str(tiny_llama), out=str(tmp_path / "o"), window=16,
                                 context_prefix=4, shard_rows=2, batch_tokens=40, progress=False, id_field="id"))
    assert manifest["complete"] and len(manifest["shards"]) >= 3
    assert seen == {"ahead": True, "behind": True}


def web_like(n: int, seed: int = 0) -> list[dict]:
    """Documents of lognormal lengths (median ~12 sentences, a long tail), as web text is."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(np.exp(rng.normal(np.log(12), 1.2, size=n)).astype(int) + 1, 400)
    return [{"id": f"d{i}", "text": " ".join(SENTENCES[(i + j) % 5] for j in range(k))} for i, k in enumerate(sizes)]


@pytest.mark.parametrize("lookahead", [None, pytest.param(1, marks=pytest.mark.xfail(strict=True))],
                         ids=["pooled", "one-shard"])
def test_batches_fill_the_token_budget_on_a_web_like_mix(tmp_path, tiny_llama, monkeypatch, lookahead):
    """Sorting across a look-ahead of many shards fills >= 90% of the budget with real tokens; sorting within each
    shard of 16 windows (the earlier batching, `one-shard`) leaves most batches part empty."""
    import rpt_data.pipeline as pipeline
    import rpt_data.pools as pools

    if lookahead is not None:
        monkeypatch.setattr(pools, "LOOKAHEAD_TOKENS", lookahead)

    proxy = StandIn()
    monkeypatch.setattr(pipeline, "build_proxy", lambda lm, **kw: proxy)
    src = write_jsonl(tmp_path / "web.jsonl", web_like(150))
    budget = 1024
    manifest = run_tag(TagConfig(inputs=[str(src)], model=str(tiny_llama), out=str(tmp_path / "o"), window=64,
                                 context_prefix=16, shard_rows=16, batch_tokens=budget, progress=False))
    assert manifest["totals"]["rows"] > 1000 and len(proxy.batches) > 40
    assert sum(proxy.batches) == manifest["totals"]["positions"]
    fill = sum(proxy.batches) / (len(proxy.batches) * budget)
    print(f"fill {fill:.3f} over {len(proxy.batches)} batches")
    assert fill >= 0.90, fill


def test_one_host_to_device_copy_per_batch_not_waited_for(tiny_llama, monkeypatch):
    """ids and mask travel as one tensor in one copy, with non_blocking (pinned memory on CUDA)."""
    from rpt_data.proxy import Proxy
    from rpt_data.windows import Window
    from transformers import AutoModelForCausalLM

    proxy = Proxy(AutoModelForCausalLM.from_pretrained(tiny_llama).eval())
    ws = [Window("d", 0, 0, "", np.arange(n, dtype=np.int32) + 5, np.arange(n, dtype=np.int32), 1) for n in (7, 4)]
    calls = []
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        calls.append(k.get("non_blocking", False))
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    ids, mask = proxy._inputs(ws)
    monkeypatch.undo()
    assert calls == [True]
    assert ids.tolist() == [list(range(5, 12)), [5, 6, 7, 8, 0, 0, 0]]
    assert mask.tolist() == [[1] * 7, [1] * 4 + [0] * 3]


def test_low_precision_hidden_states_give_float32_logits(monkeypatch):
    """bf16 hidden states: the head asks for float32 logits (on a GPU one matmul with a float32 output, checked on
    the meta device, which has that kernel's signature; on the CPU an upcast), never logits rounded to bf16."""
    import rpt_data.entropy as entropy
    from rpt_common.heads import logits_fp32

    asked = []
    real_mm = torch.mm

    def mm(*a, **k):
        asked.append(k.get("out_dtype"))
        return real_mm(*a, **k)

    monkeypatch.setattr(torch, "mm", mm)
    h = torch.empty(6, 8, dtype=torch.bfloat16, device="meta")
    w = torch.empty(11, 8, dtype=torch.bfloat16, device="meta")
    assert logits_fp32(h, w).dtype == torch.float32 and asked == [torch.float32]
    out = torch.empty(6, 11, device="meta")
    assert logits_fp32(h, w, out=out).dtype == torch.float32
    monkeypatch.undo()

    torch.manual_seed(0)
    hidden = torch.randn(9, 16).bfloat16()
    weight = (torch.randn(40, 16) * 4).bfloat16()
    targets = torch.randint(0, 40, (9,))
    seen = []
    real = entropy.token_stats
    monkeypatch.setattr(entropy, "token_stats", lambda logits, *a, **k: seen.append(logits.dtype) or real(logits, *a, **k))
    st = entropy.head_token_stats(hidden, weight, targets, top_k=8, chunk_rows=4)
    assert seen and set(seen) == {torch.float32}
    exact = hidden.double() @ weight.double().T  # bf16 products are exact in float64: the float32 logits are close
    for i, (e, te, lp, a) in enumerate(ref64(exact, targets, 8)):
        assert st.entropy[i].item() == pytest.approx(e, abs=1e-5)
        assert st.target_logprob[i].item() == pytest.approx(lp, abs=1e-5)
        assert st.argmax[i].item() == a


@pytest.fixture(scope="module")
def padded_head(tmp_path_factory):
    """A tiny Llama whose head has 40 rows past its tokenizer's vocabulary (as heads padded to a multiple of 64
    have), and those rows large, so that without the cut they would take most argmaxes and entropy mass."""
    import transformers
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("padded-head")
    tok = make_tokenizer(320)
    v = len(tok)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=512, vocab_size=v + 40,
                                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[v:] *= 6.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, v


def test_a_padded_head_scores_the_tokenizers_vocabulary_only(tmp_path, padded_head):
    from transformers import AutoModelForCausalLM

    model, v = padded_head
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    write_jsonl(tmp_path / "in.jsonl", records(6))
    run_tag(TagConfig(inputs=[str(tmp_path / "in.jsonl")], model=str(model), out=str(tmp_path / "o"), window=16,
                      context_prefix=4, shard_rows=5, batch_tokens=40, progress=False, id_field="id"))
    df = read_rows(tmp_path / "o")
    padded_wins = 0
    for row in df.iter_rows(named=True):
        ids, s = row["token_ids"], row["score_start"]
        with torch.no_grad():
            logits = lm(torch.tensor([ids])).logits[0].double()[s - 1 : len(ids) - 1]
        padded_wins += int((logits.argmax(-1) >= v).sum())  # what an uncut head would pick
        ref = ref64(logits[:, :v], torch.tensor(ids[s:]), 16)
        for t in range(s, len(ids)):
            e, te, lp, a = ref[t - s]
            assert row["proxy_argmax"][t] == a and a < v
            assert row["entropy"][t] == pytest.approx(e, abs=1e-4)
            assert row["topk_entropy"][t] == pytest.approx(te, abs=1e-4)
            assert row["target_logprob"][t] == pytest.approx(lp, abs=1e-4)
    assert padded_wins > 0  # the padded rows matter: the test would see them if they were scored


@pytest.mark.gpu
def test_cuda_bf16_head_gives_the_stats_of_float32_logits():
    """On the GPU: bf16 hidden states and head, stats equal those of the exact logits (no bf16 rounding of them)."""
    import rpt_data.entropy as entropy

    torch.manual_seed(0)
    hidden = torch.randn(64, 256, device="cuda").bfloat16()
    weight = (torch.randn(5000, 256, device="cuda") * 0.5).bfloat16()
    targets = torch.randint(0, 5000, (64,), device="cuda")
    st = entropy.head_token_stats(hidden, weight, targets, top_k=16, chunk_rows=16)
    exact = (hidden.double() @ weight.double().T).cpu()
    for i, (e, te, lp, a) in enumerate(ref64(exact, targets.cpu(), 16)):
        assert st.entropy[i].item() == pytest.approx(e, abs=2e-4)
        assert st.target_logprob[i].item() == pytest.approx(lp, abs=2e-4)
