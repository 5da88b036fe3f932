"""`torchrun --nproc-per-node 2 tests/exit_driver.py SHARDS MODEL OUT`: train() called from a user's own script
under torchrun, which then ends as Python scripts do (interpreter finalization: no rpt-train CLI, no os._exit),
for the one-core exit test of tests/test_faults_train.py."""
import sys

import torch

torch.set_num_threads(1)

from shard_fixtures import length_reward  # noqa: E402

from rpt_train.config import TrainConfig  # noqa: E402
from rpt_train.trainer import train  # noqa: E402

if __name__ == "__main__":
    shards, model, out = sys.argv[1:4]
    train(TrainConfig(shards=shards, model=model, out=out, steps=2, batch_prompts=3, group_size=2, max_new_tokens=5,
                      bucket="all", save_every=1, micro_batch_size=2, eval_every=2, eval_limit=3,
                      heldout_fraction=0.3, device="cpu"), reward_fns=[length_reward], quiet=True)
