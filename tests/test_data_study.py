"""`rpt-data prefix-study` on a tiny model whose attention sees at most 7 tokens back: a prefix that covers that
reach equals the long-context reference, a prefix of 0 does not, and the JSON reports what DESIGN.md names."""
import json

import pytest
from click.testing import CliRunner

from data_helpers import SENTENCES
from rpt_common.errors import UserError
from rpt_data.cli import main
from rpt_data.study import StudyConfig, recommend

FIELDS = ("prefix", "mae_vs_reference", "mae_first16", "tag_disagreement", "tag_disagreement_first16", "overhead")


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_sliding):
    root = tmp_path_factory.mktemp("study")
    (root / "a.txt").write_text(" ".join(SENTENCES * 12))
    (root / "b.txt").write_text("\n".join(SENTENCES[::-1] * 10))
    out = root / "out"
    result = CliRunner().invoke(main, [
        "prefix-study", "--input", str(root / "*.txt"), "--model", str(tiny_sliding), "--window", "32",
        "--prefixes", "0,4,8", "--reference-context", "16", "--tokens-per-stream", "300", "--tolerance", "0",
        "--batch-tokens", "256", "--select-above", "2.0", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "prefix-study.json").read_text())


def test_writes_json_markdown_and_plot_with_the_contract_fields(study):
    out, res = study
    assert (out / "prefix-study.md").read_text().startswith("# Context-prefix study")
    assert (out / "prefix-study.png").read_bytes()[:4] == b"\x89PNG"
    assert [e["prefix"] for e in res["prefixes"]] == [0, 4, 8]
    for e in res["prefixes"]:
        assert all(k in e for k in FIELDS)
        assert "easy" in e["bucket_disagreement"] and 0 <= e["false_positive_share"] <= 1
    assert res["recommended_prefix"] in (0, 4, 8) and len(res["by_stream"]) == 2


def test_a_prefix_beyond_the_models_reach_equals_the_reference(study):
    _, res = study
    p0, _, p8 = res["prefixes"]
    assert p8["mae_vs_reference"] < 1e-4 and p8["mae_first16"] < 1e-4
    assert p8["tag_disagreement"] == 0 and p8["false_positive_share"] == 0
    assert p0["mae_first16"] > 1e-3 > p8["mae_first16"]  # the windowing bias, gone at prefix 8
    assert p0["mae_first16"] > p0["mae_vs_reference"]  # concentrated at the window start
    assert res["recommended_prefix"] <= 8  # tolerance 0: prefix 8 qualifies, a smaller one may too


def test_overhead_is_recomputed_prefix_tokens_per_scored_token(study):
    _, res = study
    tokens = sum(s["tokens"] for s in res["streams"])
    for e in res["prefixes"]:
        later = e["windows"] - len(res["streams"])
        # every position but each stream's first, once; plain windowing also loses each later window's first
        assert e["scored"] == tokens - len(res["streams"]) - (later if e["prefix"] == 0 else 0)
        assert e["overhead"] == pytest.approx(e["prefix"] * later / e["scored"])
    assert res["prefixes"][0]["overhead"] == 0


def test_recommendation_rule():
    entries = [{"prefix": p, "tag_disagreement_first16": d} for p, d in ((0, 0.2), (16, 0.05), (32, 0.01), (64, 0.0))]
    assert recommend(entries, 0.02) == 32 and recommend(entries, 0.1) == 16 and recommend(entries[:2], 0.0) == 16


def test_prefixes_must_fit_the_window():
    with pytest.raises(UserError, match="--prefixes"):
        StudyConfig(inputs=["x.txt"], out="o", window=32, prefixes="0,32")


def test_default_prefixes_follow_the_window():
    """`prefix-study --window 256` was refused by its own default prefixes (256 is not below the window)."""
    assert StudyConfig(inputs=["x.txt"], out="o", window=256).prefixes == [0, 16, 32, 64, 128]
    assert StudyConfig(inputs=["x.txt"], out="o").prefixes == [0, 16, 32, 64, 128, 256]


def test_a_reference_longer_than_the_proxys_context_is_refused(tmp_path, tiny_sliding):
    """The reference scores --reference-context + --window tokens per window: past max_position_embeddings (512
    here) a RoPE proxy would score the reference on positions it never saw."""
    (tmp_path / "a.txt").write_text(" ".join(SENTENCES * 12))
    result = CliRunner().invoke(main, [
        "prefix-study", "--input", str(tmp_path / "a.txt"), "--model", str(tiny_sliding), "--window", "32",
        "--reference-context", "500", "--tokens-per-stream", "64", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "--reference-context 500 + --window 32" in result.output and "512 tokens" in result.output
