#!/usr/bin/env bash
# RPT with verl (checked against verl 0.9.1): the paper's recipe (arXiv 2506.08007, Sec. 4): GRPO, G=8, T=0.8,
# lr 1e-6, no KL, 8k response tokens, 256 contexts per step. Dynamic sampling (DAPO's algorithm.filter_groups) is
# read only by verl's DAPO recipe (recipe.dapo.main_dapo, in a verl source checkout with its recipe/ submodule), not
# by verl.trainer.main_ppo (checked in upstream verl's RayPPOTrainer, v0.7.0 and 0.8.0.dev): the default entry point
# main_ppo runs plain GRPO (zero-variance groups get zero advantage); ENTRY=recipe.dapo.main_dapo turns it on.
# Needs GPUs with verl and vLLM installed (pip install "verl[vllm]") and rpt-toolkit in the same environment.
#   SHARDS=out/tagged MODEL=/models/DeepSeek-R1-Distill-Qwen-14B bash pipelines/verl/rpt_paper.sh [more overrides]
# Any hydra override appended to the command line wins (e.g. trainer.nnodes=4 trainer.total_training_steps=200);
# `--cfg job` appended prints the composed verl config and exits (a check that every key below exists).
set -euo pipefail
SHARDS=${SHARDS:?set SHARDS to an rpt-data tag output directory}
MODEL=${MODEL:?set MODEL to the policy (HF directory with a chat template)}
DATA=${DATA:-out/verl-data}
GPUS=${GPUS:-8}
NODES=${NODES:-1}
RUN=${RUN:-rpt-verl}
STEPS=${STEPS:-1000}
BATCH=${BATCH:-256}
ENTRY=${ENTRY:-verl.trainer.main_ppo}  # or recipe.dapo.main_dapo (run from a verl checkout): dynamic sampling
if [ "$ENTRY" = recipe.dapo.main_dapo ]; then
  GEN_BATCHES=${GEN_BATCHES:-4}  # filter_groups draws up to this many batches of contexts per step
  DYNAMIC=(algorithm.filter_groups.enable=True algorithm.filter_groups.metric=seq_reward
           algorithm.filter_groups.max_num_gen_batches="$GEN_BATCHES")
else
  GEN_BATCHES=1; DYNAMIC=()  # main_ppo ignores filter_groups: one batch of contexts per step
fi
LIMIT=$((STEPS * BATCH * GEN_BATCHES))  # the contexts the run can draw: export those, not every position

# 1. The samples `rpt-train run` would draw, as verl RL parquet (train and held-out documents apart): the first
#    $LIMIT of `run`'s order (the export prints its row and byte estimate before writing).
rpt-train export --shards "$SHARDS" --model "$MODEL" --format verl --out "$DATA" --bucket hard --limit "$LIMIT" \
    --heldout-fraction 0.01 --heldout-limit 1024 --template v0 --max-context-tokens 1536 --overwrite

# 2. verl's PPO trainer (or DAPO's, see ENTRY) with the GRPO estimator and our prefix-match reward.
python3 -m "$ENTRY" \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    "${DYNAMIC[@]}" \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/heldout.parquet" \
    data.train_batch_size="$BATCH" \
    data.max_prompt_length=2048 \
    data.max_response_length=8192 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    data.seed=0 \
    reward.custom_reward_function.path=pkg://rpt_train.integrations.verl \
    reward.custom_reward_function.name=compute_score \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.kl_loss_coef=0.0 \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.ppo_mini_batch_size="$BATCH" \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=20480 \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=0.8 \
    actor_rollout_ref.rollout.top_p=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.val_kwargs.do_sample=True \
    actor_rollout_ref.rollout.val_kwargs.temperature=0.8 \
    actor_rollout_ref.rollout.val_kwargs.n=1 \
    trainer.n_gpus_per_node="$GPUS" \
    trainer.nnodes="$NODES" \
    trainer.total_training_steps="$STEPS" \
    trainer.save_freq=100 \
    trainer.test_freq=50 \
    trainer.val_before_train=True \
    trainer.project_name=rpt \
    trainer.experiment_name="$RUN" \
    trainer.logger='["console"]' \
    "$@"

# 3. An HF checkpoint from verl's FSDP shards, then the paper's Table 1 columns with our evaluator, on 8 GPUs,
#    the base model scored on the same positions with the same prompt (paired differences, intervals, p-values):
#   python3 -m verl.model_merger merge --backend fsdp \
#       --local_dir checkpoints/rpt/$RUN/global_step_1000/actor --target_dir out/$RUN-hf
#   torchrun --nproc-per-node 8 -m rpt_train.cli eval --shards "$SHARDS" --model out/$RUN-hf --baseline "$MODEL" \
#       --heldout-fraction 0.01 --template v0 --max-context-tokens 1536 --limit 500 --samples 8 \
#       --max-new-tokens 8192 --out out/$RUN-eval.json
