"""docs/walkthrough.md at tiny scale on CPU (issue 36): several small files in continuous mode are tagged, trained on
with a held-out split, and the run is evaluated against its base model on the same held-out positions; and the
polars one-liner of docs/shards.md slices `text` by byte offsets."""
import gzip
import json
import re
from pathlib import Path

from click.testing import CliRunner
from shard_fixtures import TEXTS, length_reward  # noqa: F401
from test_docs import doc_commands

import rpt_data.cli
import rpt_train.cli

ROOT = Path(__file__).resolve().parents[1]


def invoke(group, *args):
    r = CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_the_walkthrough_runs_end_to_end(tiny_llama, tmp_path):
    stages = [(prog, a[0], a) for where, prog, a in doc_commands() if where.startswith("docs/walkthrough.md")]
    order = [f"{prog} {cmd}" for prog, cmd, _ in stages]
    assert order.index("rpt-data tag") < order.index("rpt-train run") < order.index("rpt-train eval")
    assert "--baseline" in next(a for _, cmd, a in stages if cmd == "eval")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):  # part-00000.jsonl.gz ...: one stream per file, a few windows each
        with gzip.open(data / f"part-{i:05d}.jsonl.gz", "wt") as f:
            for j in range(3):
                f.write(json.dumps({"text": TEXTS[(i + j) % len(TEXTS)]}, ensure_ascii=False) + "\n")
    shards, run = tmp_path / "web", tmp_path / "rpt"
    invoke(rpt_data.cli.main, "tag", "--input", f"{data}/*.jsonl.gz", "--text-field", "text", "--mode", "continuous",
           "--model", tiny_llama, "--window", 32, "--context-prefix", 8, "--out", shards, "--device", "cpu")
    invoke(rpt_data.cli.main, "validate", shards)
    invoke(rpt_train.cli.main, "plan", "--shards", shards, "--model", tiny_llama, "--device", "cpu",
           "--max-new-tokens", 4, "--device-memory", 8)
    out = invoke(rpt_train.cli.main, "run", "--shards", shards, "--model", tiny_llama, "--out", run,
                 "--heldout-fraction", 0.3, "--split-block-windows", 2, "--steps", 2, "--batch-prompts", 2,
                 "--group-size", 2, "--max-new-tokens", 4, "--bucket", "all", "--device", "cpu",
                 "--reward", "shard_fixtures:length_reward", "--save-every", 2)
    held = int(re.search(r"held out: (\d+) positions", out).group(1))
    assert held > 0
    verdict = tmp_path / "verdict.json"
    invoke(rpt_train.cli.main, "eval", "--shards", shards, "--model", run, "--baseline", tiny_llama,
           "--limit", 4, "--samples", 2, "--max-new-tokens", 4, "--device", "cpu", "--out", verdict)
    res = json.loads(verdict.read_text())
    assert res["meta"]["split"] == "heldout" and res["meta"]["split_block_windows"] == 2
    from rpt_common.shards import shards_identity

    assert res["meta"]["shards_identity"] == shards_identity(shards) is not None  # checked where records are paired
    assert 0 < res["all"]["n"] <= 4 and res["baseline"]["all"]["n"] == res["all"]["n"]
    assert set(res["comparison"]["all"]) == {"ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "ntp_accuracy"}
    from rpt_train.samples import is_heldout, split_unit

    for p in res["positions"]:  # only held-out blocks are evaluated
        doc, window, _ = p["key"].rsplit("/", 2)
        assert is_heldout(split_unit(doc, int(window), 2), 0.3, 0)


def test_the_shards_page_polars_snippet_cuts_tokens_by_bytes(tiny_llama, tmp_path):
    """The python block of docs/shards.md, run on shards with non-ASCII text: every token is the UTF-8 bytes of
    `text` between its byte offsets (str.slice would count characters and cut elsewhere)."""
    from shard_fixtures import write_shards

    shards = write_shards(tmp_path / "tagged", tiny_llama)
    page = (ROOT / "docs" / "shards.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "pl.Binary" in b)
    from rpt_train.samples import ShardSet

    where = Path(ShardSet(str(shards)).paths[0]).parent  # wherever the writer puts shards (OUT or OUT/data)
    code = re.sub(r'"out/demo[^"]*"', f'"{where}/*.parquet"', code).split("import datasets")[0]
    env: dict = {}
    exec(code, env)
    pos = env["pos"]
    assert pos.height > 0
    rows = pos.select("text", "start", "end", "token", "context").rows()
    assert any(len(text.encode()) != len(text) for text, *_ in rows)  # non-ASCII windows are in the sample
    for text, start, end, token, context in rows:
        assert token == text.encode()[start:end] and context == text.encode()[:start]
