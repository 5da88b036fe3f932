"""`rpt-data tag` on every model family a proxy plausibly is: tiny random models built from transformers' config
classes (tests/tiny.py). Shards' stats must equal a float64 recomputation from `model(input).logits` of the very
input the tagger fed (BOS included), the start-up head check must pass, and a broken head must be refused."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from data_helpers import read_rows, records, write_jsonl
from rpt_common import bos as bos_rule
from rpt_common.errors import UserError
from rpt_common.models import load_causal_lm
from rpt_data import proxy as proxy_mod
from rpt_data.cli import main
from rpt_data.config import TagConfig
from rpt_data.pipeline import run_tag
from tiny import make_model_dir, make_tokenizer

# (case id, tiny.ARCHS key, make_model_dir options): the families of the issue, Falcon-H1 and Phi (lm_head bias);
# the Gemmas and one Llama get a tokenizer that adds a BOS, as the real ones do.
FAMILIES = [
    ("llama", "llama", {}), ("llama-bos", "llama", {"bos": True}), ("qwen2", "qwen2", {"tie": False}),
    ("qwen3", "qwen3", {}), ("mistral", "mistral", {}), ("gemma-bos", "gemma", {"bos": True}),
    ("gemma2-bos", "gemma2", {"bos": True}), ("gemma3-bos", "gemma3", {"bos": True}),
    ("phi3", "phi3", {"tie": False}), ("phi", "phi", {"tie": False}), ("gpt2", "gpt2", {}),
    ("gpt_neox", "gpt_neox", {"tie": False}), ("granite", "granite", {}), ("cohere", "cohere", {}),
    ("olmo2", "olmo2", {"tie": False}), ("falcon_h1", "falcon_h1", {"tie": False}),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Each family's tiny model directory, built once per module on first use."""
    built = {}

    def get(case: str):
        if case not in built:
            _, arch, opts = next(f for f in FAMILIES if f[0] == case)
            built[case] = make_model_dir(tmp_path_factory.mktemp(case), arch=arch, **opts)
        return built[case]

    return get


def tag_config(tmp_path, model, **kw) -> TagConfig:
    src = tmp_path / "in.jsonl"
    if not src.exists():
        write_jsonl(src, records(2))
    opts = dict(window=16, context_prefix=4, shard_rows=50, batch_tokens=64, progress=False, device="cpu") | kw
    return TagConfig(inputs=[str(src)], model=str(model), out=str(tmp_path / "out"), **opts)


def stats64(logits: torch.Tensor, targets: torch.Tensor, k: int = 16) -> dict[str, np.ndarray]:
    """float64 entropy, top-k entropy, target log-prob and argmax of each row of `logits`."""
    x = logits.double()
    logp = torch.log_softmax(x, -1)
    topv = torch.topk(x, min(k, x.shape[-1]), -1).values
    topp = torch.log_softmax(topv, -1)
    return {"entropy": -(logp.exp() * logp).sum(-1).numpy(), "topk_entropy": -(topp.exp() * topp).sum(-1).numpy(),
            "target_logprob": logp.gather(1, targets.view(-1, 1)).squeeze(1).numpy(),
            "proxy_argmax": x.argmax(-1).numpy()}


@pytest.mark.parametrize("case", [f[0] for f in FAMILIES])
def test_shards_equal_the_models_own_logits(tmp_path, model_dirs, case, monkeypatch):
    model_dir = model_dirs(case)
    checks = []
    real_verify = proxy_mod.Proxy.verify

    def spy(self, ids):
        checks.append(real_verify(self, ids))
        return checks[-1]

    monkeypatch.setattr(proxy_mod.Proxy, "verify", spy)
    manifest = run_tag(tag_config(tmp_path, model_dir))
    assert len(checks) == 1 and checks[0] < 1e-3  # the start-up check ran, on fp32 logits, and passed

    tok = load_causal_lm(str(model_dir), "cpu", "float32")
    bos = bos_rule.bos_token_id(tok.tokenizer)
    assert (bos is not None) == ("bos" in case)
    assert manifest["bos"] == {"used": bos is not None, "token_id": bos}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["bos"] == manifest["bos"]
    model, off = tok.model, int(bos is not None)
    df = read_rows(tmp_path / "out")
    assert df.height > len(records(2))  # several windows per record: context prefixes are exercised
    for row in df.iter_rows(named=True):
        ids, s = row["token_ids"], row["score_start"]
        assert s == (4 if row["window_index"] else 0 if bos is not None else 1)  # with a BOS, position 0 is scored
        fed = ([bos] if bos is not None else []) + ids  # what the tagger fed: the BOS in front of every window
        with torch.no_grad():
            logits = model(torch.tensor([fed]), use_cache=False).logits[0]
        # index t is p(x_t | BOS, x<t): the logits at input t - 1 + off
        want = stats64(logits[s - 1 + off : len(ids) - 1 + off], torch.tensor(ids[s:]))
        for name, ref in want.items():
            got = row[name]
            assert all(v is None for v in got[:s]), name
            if name == "proxy_argmax":
                assert got[s:] == ref.tolist()
            else:
                np.testing.assert_allclose(np.asarray(got[s:], dtype=np.float64), ref, atol=1e-4, err_msg=name)


# How each break reproduces a head that ignores what the family's forward does (the bug the check prevents).
BREAKS = [
    ("granite", {"scale": None}),  # Granite's logits / logits_scaling forgotten
    ("cohere", {"scale": None}),  # Cohere's logit_scale forgotten
    ("falcon_h1", {"scale": None}),  # Falcon-H1's lm_head_multiplier forgotten
    ("gemma2-bos", {"softcap": None}),  # Gemma-2's final soft-cap forgotten
    ("phi", {"bias": None}),  # Phi's lm_head bias forgotten
    ("llama", {"scale": 1.5}),  # a scale that Llama does not have
]


@pytest.mark.parametrize("case,change", BREAKS, ids=[b[0] for b in BREAKS])
def test_a_broken_head_is_refused_with_exit_2(tmp_path, model_dirs, case, change, monkeypatch):
    real = proxy_mod.head_spec
    monkeypatch.setattr(proxy_mod, "head_spec", lambda model: dataclasses.replace(real(model), **change))
    cfg = tag_config(tmp_path, model_dirs(case))
    result = CliRunner().invoke(main, ["tag", "--input", cfg.inputs[0], "--model", cfg.model, "--out", cfg.out,
                                       "--window", "16", "--context-prefix", "4", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    model_type = json.loads((model_dirs(case) / "config.json").read_text())["model_type"]
    assert f"model type '{model_type}'" in result.output and "max difference" in result.output
    assert not list((tmp_path / "out").glob("**/shard-*"))  # refused before any shard was written


@pytest.mark.parametrize("case,change", [("granite", {"scale": None}), ("gemma2-bos", {"softcap": None})])
def test_bf16_passes_when_right_and_refuses_when_broken(model_dirs, case, change):
    """The bf16 tolerance (two bf16 roundings of the largest logit) is loose enough for bf16 and still catches a
    forgotten scale or soft-cap."""
    lm = load_causal_lm(str(model_dirs(case)), "cpu", "bfloat16")
    proxy = proxy_mod.build_proxy(lm)
    ids = proxy_mod.check_ids(lm.tokenizer)
    proxy.verify(ids)  # raises on a mismatch
    proxy.head = dataclasses.replace(proxy.head, **change)
    with pytest.raises(UserError, match="max difference"):
        proxy.verify(ids)


def test_bos_rule_reads_what_the_tokenizer_does():
    plain, with_bos = make_tokenizer(), make_tokenizer(bos=True)
    assert bos_rule.bos_token_id(plain) is None
    bos = bos_rule.bos_token_id(with_bos)
    assert bos is not None and bos == with_bos.bos_token_id and with_bos("a")["input_ids"][0] == bos
    assert not with_bos.__dict__.get("add_bos_token", False)  # the post-processor adds it; no flag says so
    # a BOS token the tokenizer knows but does not add is no BOS to feed
    named = make_tokenizer()
    named.add_special_tokens({"bos_token": "<|endoftext|>"})
    assert named.bos_token_id is not None and bos_rule.bos_token_id(named) is None
    text = "Hello world"
    assert bos_rule.encode_with_bos(with_bos, [text]) == [[bos] + with_bos(text, add_special_tokens=False)["input_ids"]]
    assert bos_rule.encode_with_bos(plain, [text]) == [plain(text, add_special_tokens=False)["input_ids"]]


def test_ntp_baseline_feeds_the_bos_as_the_tagger_does(tmp_path, model_dirs):
    """The eval's greedy next token after a context = the tagger's proxy_argmax at that position (same model)."""
    from rpt_train.evaluate import greedy_next_tokens

    model_dir = model_dirs("llama-bos")
    run_tag(tag_config(tmp_path, model_dir))
    lm = load_causal_lm(str(model_dir), "cpu", "float32")
    tok = lm.tokenizer
    rows = read_rows(tmp_path / "out")
    contexts, want = [], []
    for row in rows.filter(rows["window_index"] == 0).iter_rows(named=True):
        data = row["text"].encode()
        for t in range(1, len(row["token_ids"])):
            context = data[: row["token_bytes"][t - 1]].decode("utf-8", errors="ignore")
            if tok(context, add_special_tokens=False)["input_ids"] == row["token_ids"][:t]:  # the same input
                contexts.append(context)
                want.append(tok.decode([row["proxy_argmax"][t]], clean_up_tokenization_spaces=False))
    assert len(contexts) >= 10
    # one left-padded batch of contexts of different lengths
    assert greedy_next_tokens(lm.model, tok, contexts, batch_size=len(contexts)) == want
