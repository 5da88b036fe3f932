"""Slow checks with the real demo assets (SmolLM2-135M-Instruct, CHAMP); run with `pytest -m slow`."""
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_cached_safetensors_equal_the_gguf():
    from transformers import AutoModelForCausalLM

    from rpt_common.assets import demo_gguf_path, demo_model_dir
    from rpt_data.entropy import token_stats

    gguf = demo_gguf_path()
    a = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    b = AutoModelForCausalLM.from_pretrained(demo_model_dir()).eval()
    ids = torch.randint(0, a.config.vocab_size, (1, 64))
    with torch.no_grad():
        sa, sb = token_stats(a(ids).logits[0], ids[0]), token_stats(b(ids).logits[0], ids[0])
    for x, y in zip(sa, sb):
        assert torch.equal(x, y)


def test_demo_recipe_runs(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "rpt_data.cli", "tag", "pipelines/demo.yaml", "--limit", "8", "--out", str(out),
           "--no-progress"]
    subprocess.run(cmd, check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["records"] == 8 and manifest["totals"]["selected"] > 0


def test_reader_and_windows_stream_in_bounded_memory(tmp_path):
    """~200 MB of jsonl through readers + windowing (no model): RSS must not grow with the input."""
    script = f"""
import json, resource, itertools
from rpt_common.models import load_tokenizer
from rpt_data.readers import RecordParser, read_all
from rpt_data.pipeline import pieces
from rpt_data.windows import windows_from_pieces
path = {str(tmp_path / 'big.jsonl')!r}
line = json.dumps({{"text": "The quick brown fox jumps over the lazy dog. " * 40}}) + "\\n"
with open(path, "w") as f:
    for _ in range(110_000):
        f.write(line)
tok = load_tokenizer("demo")
recs = read_all([(path, "jsonl")], RecordParser("text", None, None))
wins = windows_from_pieces(pieces(recs, "continuous", "\\n\\n"), tok, 1024, 128)
n, base = 0, None
for n, w in enumerate(wins):
    if n == 2000:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"windows": n, "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""
    res = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert res["windows"] > 20_000
    assert res["rss_growth_mib"] < 100
