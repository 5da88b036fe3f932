"""A run directory's saved files (config.yaml, run.json, a checkpoint's trainer_state.json and trainer_state.pt) are
read back by `rpt-train eval --model RUN` (or a checkpoint of it), by a run or an export that starts from another
run's checkpoint, and by --resume. Invariant: whatever damage a file has (truncated, binary bytes, empty, a YAML or
JSON list, plain text, a value of another type for each kind of option: str, float, int, bool, list), every reader
says so in one UserError naming the file (and the key, for a value), never another exception, never silently; keys
that are no option (a newer or older version's) are ignored."""
import json

import pytest
import torch
import yaml

from rpt_common.errors import UserError
from rpt_train.checkpoint import load_trainer_state
from rpt_train.config import EvalConfig, ExportConfig, TrainConfig, load_config, to_dict
from rpt_train.rundir import provenance, read_provenance, write_record

STEP = "step-000002"
CFG = TrainConfig(shards="shards", heldout_fraction=0.25, split_seed=3, split_block_windows=16,
                  template="think-brief", temperature=0.7)

# content damage, the same for every file (the text readers' and torch.load's)
GARBAGE = {
    "binary": bytes(range(256)) * 4,
    "control bytes": b"\x00\x01\x02template: v0\n",
    "empty": b"",
    "list": b"- a\n- b\n",
    "json list": b"[1, 2]",
    "text": b"just text\n",
    "number": b"7\n",
}
YAML_TRUNCATED = {"truncated list": b"template: v0\ntemperature: [0.8\n", "truncated quote": b'template: "thi\n'}
# one wrong value per kind of option: key, value
WRONG = {"str": ("template", 7), "str list": ("template", ["v0"]), "float": ("temperature", "hot"),
         "float list": ("top_p", [1]), "float bool": ("temperature", True), "int": ("max_new_tokens", "lots"),
         "int float": ("top_k", 1.5), "int bool": ("seed", True), "bool": ("static_cache", "maybe"),
         "list": ("bucket_thresholds", ["a", "b", "c"]), "null": ("template", None), "map": ("temperature", {"a": 1})}
RECORD_WRONG = {"float": ("heldout_fraction", "x"), "int": ("split_seed", 1.5), "int bool": ("split_block_windows", True),
                "str": ("shards", 7), "range": ("heldout_fraction", 1.5)}


def _write_run(run):
    ckpt = run / "checkpoints" / STEP
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(CFG), sort_keys=False))
    write_record(run, provenance(CFG, 10) | {"heldout": {"documents": 1}})
    state = {"step": 2, "scheduler": {}, "sampler": {}, "rng": {}, "config": to_dict(CFG)}
    torch.save(state, ckpt / "trainer_state.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "config": to_dict(CFG)}))
    return ckpt


READERS = {  # entry point -> what it does with the run directory
    "eval run": lambda run: load_config(EvalConfig, None, {"shards": "s", "model": str(run)}),
    "eval checkpoint": lambda run: load_config(EvalConfig, None, {"shards": "s", "model": str(run / "checkpoints" / STEP)}),
    "run from run": lambda run: load_config(TrainConfig, None, {"shards": "s", "model": str(run), "out": "o"}),
    "export from checkpoint": lambda run: load_config(ExportConfig, None, {"shards": "s", "format": "verl",
                                                                           "model": str(run / "checkpoints" / STEP)}),
    "provenance": lambda run: read_provenance(str(run)),
    "resume": lambda run: load_trainer_state(run / "checkpoints" / STEP),
}
READS = {"config.yaml": ("eval run", "eval checkpoint"),
         "run.json": ("eval run", "eval checkpoint", "run from run", "export from checkpoint", "provenance"),
         "trainer_state.json": ("eval run", "eval checkpoint", "run from run", "export from checkpoint", "provenance"),
         "trainer_state.pt": ("resume",)}


def _damages(name):
    """(label, bytes, key named or None) for file `name`."""
    out = [(label, data, None) for label, data in GARBAGE.items()]
    if name == "config.yaml":
        out += [(label, data, None) for label, data in YAML_TRUNCATED.items()]
        out += [(f"{kind} {key}", yaml.safe_dump({**to_dict(CFG), key: value}).encode(), key)
                for kind, (key, value) in WRONG.items()]
    elif name == "run.json":
        good = provenance(CFG, 10)
        out += [("truncated", json.dumps(good).encode()[:40], None)]
        out += [(f"{kind} {key}", json.dumps({**good, key: value}).encode(), key)
                for kind, (key, value) in RECORD_WRONG.items()]
    elif name == "trainer_state.json":
        good = {"step": 2, "config": to_dict(CFG)}
        out += [("truncated", json.dumps(good).encode()[:60], None), ("config list", b'{"config": [1]}', None)]
        # only its split keys are read (a run from before run.json), so only they are checked: damage elsewhere
        # in its config changes nothing read from it (as run.json's unread keys)
        out += [(f"{kind} {key}", json.dumps({**good, "config": {**to_dict(CFG), key: value}}).encode(), key)
                for kind, (key, value) in RECORD_WRONG.items() if key != "split_block_windows"]
    return out


def _pt_damages(tmp_path):
    """trainer_state.pt: a truncated file, garbage, pickles of other shapes, a config value of each wrong kind."""
    good = tmp_path / "good.pt"
    torch.save({"step": 2, "scheduler": {}, "sampler": {}, "rng": {}, "config": to_dict(CFG)}, good)
    out = [(label, data, None) for label, data in GARBAGE.items()] + [("truncated", good.read_bytes()[:200], None)]
    base = {"step": 2, "scheduler": {}, "sampler": {}, "rng": {}}
    shapes = [("list", [1, 2], None), ("no scheduler", {"step": 2, "sampler": {}, "rng": {}}, None),
              ("step str", {**base, "step": "2"}, None), ("config list", {**base, "config": [1]}, None)]
    shapes += [(f"{kind} {key}", {**base, "config": {**to_dict(CFG), key: value}}, key)
               for kind, (key, value) in WRONG.items()]
    for label, obj, key in shapes:
        path = tmp_path / "shape.pt"
        torch.save(obj, path)
        out.append((label, path.read_bytes(), key))
    return out


@pytest.mark.parametrize("name", list(READS))
def test_every_reader_of_a_damaged_run_file_says_which_file_and_key(name, tmp_path):
    run = tmp_path / "run"
    ckpt = _write_run(run)
    for reader in READS[name]:
        READERS[reader](run)  # the intact run directory reads
    path = ckpt / name if name.startswith("trainer_state") else run / name
    if name == "trainer_state.json":
        (run / "run.json").unlink()  # read only for a run from before run.json
        READERS["provenance"](run)
        assert read_provenance(str(run))["heldout_fraction"] == 0.25
    damages = _pt_damages(tmp_path) if name == "trainer_state.pt" else _damages(name)
    failures = []
    for label, data, key in damages:
        path.write_bytes(data)
        for reader in READS[name]:
            try:
                READERS[reader](run)
                failures.append(f"{label} / {reader}: accepted")
            except UserError as e:
                if str(path) not in str(e) or (key and f"'{key}'" not in str(e)):
                    failures.append(f"{label} / {reader}: the message does not name the file/key: {e}")
            except Exception as e:  # noqa: BLE001 - the invariant: nothing but a UserError
                failures.append(f"{label} / {reader}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_saved_values_are_typed_and_unknown_keys_ignored(tmp_path):
    """An int where a float is saved is the float; keys of other versions are ignored, not refused; an older
    run's null budget option is 'not recorded' as before."""
    run = tmp_path / "run"
    _write_run(run)
    (run / "config.yaml").write_text(yaml.safe_dump({**to_dict(CFG), "temperature": 1, "from_the_future": [1, 2],
                                                     "think_decay_steps": None}))
    cfg = load_config(EvalConfig, None, {"shards": "s", "model": str(run)})
    assert cfg.temperature == 1.0 and isinstance(cfg.temperature, float) and cfg.template == "think-brief"
    (run / "run.json").write_text(json.dumps({**provenance(CFG, 10), "new_key": {"x": 1}, "split_seed": 4}))
    assert load_config(TrainConfig, None, {"shards": "s", "model": str(run)}).split_seed == 4
