"""`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/eval_driver.py SHARDS MODEL OUT.json`:
every rank scores its stripe of the eval positions (rpt_train.compare._score with details); rank 0 writes the
result with every completion, for tests/test_train_eval_compare.py to compare with one process."""
import json
import sys

import torch

torch.set_num_threads(1)

from rpt_train import distributed  # noqa: E402
from rpt_train.compare import _score  # noqa: E402
from rpt_train.config import EvalConfig  # noqa: E402
from rpt_train.samples import ShardSet  # noqa: E402

EVAL = dict(limit=5, samples=2, max_new_tokens=6, device="cpu", rollout_batch_size=4, temperature=1.0, seed=3)


def score(shards: str, model: str) -> dict:
    cfg = EvalConfig(shards=shards, model=model, **EVAL)
    return _score(cfg, model, "cpu", ShardSet(shards), None)[0]


if __name__ == "__main__":
    shards, model, out = sys.argv[1:4]
    distributed.init_from_env("cpu")
    result = score(shards, model)
    if distributed.is_main():
        open(out, "w").write(json.dumps({"world": distributed.world_size(), **result}))
    distributed.shutdown()
