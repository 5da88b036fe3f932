"""The training half of RPT, module by module in the order a step runs (the modules stay flat so that
`from rpt_train.samples import ...` keeps working; this map is the flow):

samples and prompts  candidates.py (every usable position, compact) -> samples.py (buckets, held-out split, order,
                     labels) -> sampler.py (`--sampler learnability`) -> templates.py (prompts)
rollout              rollout.py (`RolloutEngine`, `HFRollout`) -> collect.py (one step's groups, dynamic sampling)
reward               reward.py (the last `\\boxed{}` against the continuation cut at a token boundary)
update               advantages.py -> packing.py (shared prefix) -> logprobs.py (chunked, head applied explicitly)
                     -> loss.py -> update.py (epochs, mini/micro-batches, AdamW) under precision.py
loop                 trainer.py (`train`: the loop, resume, checkpoints) with config.py and metrics.py
beside it            evaluate.py and stats.py (`rpt-train eval`), export.py and integrations/ (verl, TRL,
                     OpenRLHF), cli.py
runtime              distributed.py (torchrun, FSDP2), checkpoint.py and rundir.py (the run directory),
                     policy.py (loading), plan.py (`rpt-train plan`)
"""
