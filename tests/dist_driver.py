"""Multi-rank scenarios for tests/test_train_distributed.py, run by every rank of
`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_driver.py PLAN.json`.

The process group is started here, so that several `train()` calls share it (train() leaves a group it did not
start alone). Each scenario writes under the plan's root; the test reads the results from there."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from shard_fixtures import length_reward  # noqa: E402

from rpt_train.rollout import RolloutBatch  # noqa: E402


class PromptEngine:
    """Completions that are a function of the prompt only (so how contexts are split over ranks does not matter):
    completion j of a prompt has 1 + (h + j) % 4 tokens, or the same length for all j when h % 3 == 0 (a group
    with equal rewards under `length_reward`, dropped by dynamic sampling); a made-up sampler entropy per token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, params):
        pad = self.tokenizer.pad_token_id
        rows = []
        for p in prompts:
            h = sum(p) % 97
            for j in range(params.n):
                n = 1 + ((h if h % 3 == 0 else h + j) % 4)
                rows.append((p, [(h * 31 + j * 17 + k * 7) % 250 + 5 for k in range(n)]))
        P = max((len(p) for p, _ in rows), default=0)
        C = max((len(c) for _, c in rows), default=0)
        def table(values):  # [rows, width] even when there are no rows
            return torch.tensor(values, dtype=torch.long).view(len(rows), -1 if values else 0)

        return RolloutBatch(prompt_ids=table([[pad] * (P - len(p)) + p for p, _ in rows]),
                            prompt_mask=table([[0] * (P - len(p)) + [1] * len(p) for p, _ in rows]),
                            completion_ids=table([c + [pad] * (C - len(c)) for _, c in rows]),
                            completion_mask=table([[1] * len(c) + [0] * (C - len(c)) for _, c in rows]),
                            logprobs=None, texts=["x" * len(c) for _, c in rows],
                            entropy=torch.tensor([[0.1 + (sum(p) + len(c) + k) % 5 / 5 if k < len(c) else 0.0
                                                   for k in range(C)] for p, c in rows]).view(len(rows), C))

    def sync(self, model):
        pass


def config(plan: dict, out: Path, **kw):
    from rpt_train.config import TrainConfig

    return TrainConfig(**(plan["base"] | {"out": str(out)} | kw))


def scripted_train(plan: dict, out: Path, poison_rank: int | None = None, poison_step: int = 0, flat: bool = False,
                   **kw) -> None:
    """train() with PromptEngine; with poison_rank, that rank's loss is NaN at poison_step; `flat`: every reward 0."""
    import rpt_train.trainer as trainer
    import rpt_train.update as update
    from rpt_common.models import load_tokenizer

    cfg = config(plan, out, **kw)
    saved = trainer.collect, update.aggregate
    state = {"step": 0}
    if poison_rank is not None:
        def counting_collect(*a, **k):
            state["step"] += 1
            return saved[0](*a, **k)

        def poisoned_aggregate(*a, **k):
            loss = saved[1](*a, **k)
            hit = state["step"] == poison_step and torch.distributed.get_rank() == poison_rank
            return loss * float("nan") if hit else loss

        trainer.collect, update.aggregate = counting_collect, poisoned_aggregate
    try:
        trainer.train(cfg, reward_fns=[] if flat else [length_reward], engine=PromptEngine(load_tokenizer(cfg.model)),
                      quiet=True)
    finally:
        trainer.collect, update.aggregate = saved


def lockstep(plan: dict, out: Path) -> None:
    """HFRollout through the sharded model while rank 0's rows end at once (half the vocabulary is EOS) and rank
    1's never do: no hang, and each rank gets what the unsharded model samples with the same seed."""
    from rpt_train import distributed
    from rpt_train.policy import load_policy
    from rpt_train.rollout import HFRollout, SamplingParams

    rank = torch.distributed.get_rank()
    policy = load_policy(plan["base"]["model"], "cpu")
    plain = load_policy(plan["base"]["model"], "cpu").model
    sharded = distributed.shard_model(policy.model, "cpu")
    eos = list(range(0, len(policy.tokenizer), 2)) if rank == 0 else []
    prompts = [policy.tokenizer("The quick brown fox")["input_ids"], policy.tokenizer("Let x_n be")["input_ids"]]
    mine = prompts[: 1 + rank]  # uneven prompt counts too: rank 0 runs a discarded copy of its prompt
    params = SamplingParams(n=2, max_new_tokens=7, temperature=1.0)
    results = {}
    for name, model, step_together, batch_prompts in (("sharded", sharded, True, mine),
                                                       ("plain", plain, False, mine + mine[:1] * (2 - len(mine)))):
        torch.manual_seed(1234 + rank)
        batch = HFRollout(model, policy.tokenizer, eos, lockstep=step_together).generate(batch_prompts, params)
        rows = len(mine) * params.n
        results[name] = {"ids": batch.completion_ids[:rows].tolist(), "mask": batch.completion_mask[:rows].tolist()}
    (out / f"lockstep-rank{rank}.json").write_text(json.dumps(results))


def agree(plan: dict, out: Path) -> None:
    """load_sharded_policy of a checkpoint whose generation_config.json lists more EOS ids than its config.json,
    then rollouts of equal prompts with the same seed on each rank: what each rank read and where it stopped."""
    from rpt_train import distributed
    from rpt_train.policy import eos_ids
    from rpt_train.rollout import HFRollout, SamplingParams

    rank = torch.distributed.get_rank()
    loaded = distributed.load_sharded_policy(plan["agree"], "cpu")
    tok = loaded.tokenizer
    prompts = [tok("The quick brown fox")["input_ids"], tok("Let x_n be")["input_ids"]]
    torch.manual_seed(1234)
    batch = HFRollout(loaded.model, tok, eos_ids(loaded), lockstep=True).generate(
        prompts, SamplingParams(n=3, max_new_tokens=8))
    gen = loaded.model.generation_config
    (out / f"agree-rank{rank}.json").write_text(json.dumps({
        "eos_ids": eos_ids(loaded), "generation_eos": gen.eos_token_id, "pad": tok.pad_token_id,
        "chat_template": tok.chat_template, "ids": batch.completion_ids.tolist(),
        "lengths": batch.lengths.tolist()}))


def sharded_load(plan: dict, out: Path) -> None:
    """load_sharded_policy (with the trainer's prepare: dropout off, gradient checkpointing) of each model in
    plan["sharded_load"], recording every policy.load_policy call and whether each parameter and buffer of the model
    handed to shard_model was still on the meta device; then the gathered full weights, the buffers and a forward
    against this rank's own 1-process load_policy."""
    from types import SimpleNamespace

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import rpt_train.policy as policy
    from rpt_train import distributed
    from rpt_train.trainer import prepare_policy

    rank = torch.distributed.get_rank()
    load, shard = policy.load_policy, distributed.shard_model
    prepare = lambda m: prepare_policy(SimpleNamespace(gradient_checkpointing=True), m)  # noqa: E731
    for name, spec in plan["sharded_load"].items():
        calls, meta = [], []

        def recording_load(spec, device="auto", dtype="float32", weights=True):
            calls.append([str(device), dtype, weights])
            return load(spec, device, dtype, weights)

        def recording_shard(model, *a, **k):
            meta.append(all(t.is_meta for t in [*model.parameters(), *model.buffers()]))
            return shard(model, *a, **k)

        policy.load_policy, distributed.shard_model = recording_load, recording_shard
        try:
            # "cpu:0": another name for the device, so that a load of the weights on `device` would show
            loaded = distributed.load_sharded_policy(spec, "cpu:0", prepare=prepare)
        finally:
            policy.load_policy, distributed.shard_model = load, shard
        ref = load(spec, "cpu")
        prepare(ref.model)
        model = loaded.model
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        want = ref.model.state_dict()
        bufs, want_bufs = dict(model.named_buffers()), dict(ref.model.named_buffers())
        ids = torch.tensor([loaded.tokenizer("The quick brown fox jumps")["input_ids"]])
        with torch.no_grad():
            got_logits, want_logits = model(ids).logits, ref.model(ids).logits
        (out / f"sharded-load-{name}-rank{rank}.json").write_text(json.dumps({
            "calls": calls, "meta_at_shard": meta, "keys": sorted(full) == sorted(want),
            "weights_equal": all(torch.equal(full[k], want[k]) for k in want),
            "buffers": sorted(bufs) == sorted(want_bufs),
            "buffers_equal": all(torch.equal(bufs[k], want_bufs[k]) for k in want_bufs),
            "logits_diff": float((got_logits - want_logits).abs().max()),
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
            "ref_tied": ref.model.get_output_embeddings().weight is ref.model.get_input_embeddings().weight,
            "gradient_checkpointing": model.is_gradient_checkpointing,
            "generation_eos": model.generation_config.eos_token_id,
            "ref_generation_eos": ref.model.generation_config.eos_token_id,
            "identity": loaded.identity, "ref_identity": ref.identity, "path": loaded.path, "ref_path": ref.path}))


def load_fails(plan: dict, out: Path) -> None:
    """load_sharded_policy of each case of plan["load_fails"] ([name, {model, fail_rank, fail_weights, message}]):
    policy.load_policy raises UserError(message) on rank `fail_rank` for its weights (True: rank 0's host load) or
    skeleton (False) load; a case without fail_rank loads as it is (an unreadable checkpoint fails by itself). Each
    rank records the [exception type, message] it got per case (None: it loaded), so the cases also show that the
    ranks leave a failed load together, ready for the next one."""
    import rpt_train.policy as policy
    from rpt_common.errors import UserError
    from rpt_train import distributed

    rank = torch.distributed.get_rank()
    load, results = policy.load_policy, {}
    for name, case in plan["load_fails"]:
        def failing_load(spec, device="auto", dtype="float32", weights=True, case=case):
            if case.get("fail_rank") == rank and case["fail_weights"] == weights:
                raise UserError(case["message"])
            return load(spec, device, dtype, weights)

        policy.load_policy = failing_load
        try:
            distributed.load_sharded_policy(case["model"], "cpu")
            results[name] = None
        except Exception as e:  # noqa: BLE001 - recorded for the test
            results[name] = [type(e).__name__, str(e)]
        finally:
            policy.load_policy = load
        print(f"rank {rank} {name}: {results[name]}", flush=True)
    (out / f"load-fails-rank{rank}.json").write_text(json.dumps(results))


def main() -> None:
    import datetime

    plan = json.loads(Path(sys.argv[1]).read_text())
    root = Path(plan["root"])
    # a plan's timeout_s bounds every collective: a rank left waiting by the others fails instead of hanging
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=plan.get("timeout_s", 1800)))
    try:
        for name, kw in plan["scripted"]:  # deterministic rollouts: equal to one process
            scripted_train(plan, root / name, **kw)
        if plan.get("lockstep"):
            lockstep(plan, root)
        if plan.get("agree"):
            agree(plan, root)
        if plan.get("sharded_load"):
            sharded_load(plan, root)
        if plan.get("load_fails"):
            load_fails(plan, root)
        from rpt_train.trainer import train

        for name, kw in plan["sampled"]:  # HFRollout through FSDP; resumes
            train(config(plan, root / name, **kw), reward_fns=[length_reward], quiet=True)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
