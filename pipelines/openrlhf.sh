#!/usr/bin/env bash
# RPT with OpenRLHF (flags checked against openrlhf 0.11.2; before 0.10 they were flat, e.g. --remote_rm_url,
# --input_key, --n_samples_per_prompt): the paper's recipe: group-normalised advantages (GRPO), G=8, T=0.8,
# lr 1e-6, no KL (no reference model), 8k response tokens, 256 contexts per step, dynamic filtering.
# Needs a Ray cluster with GPUs, openrlhf[vllm] and rpt-toolkit installed on every node.
#   SHARDS=out/tagged MODEL=/models/DeepSeek-R1-Distill-Qwen-14B bash pipelines/openrlhf.sh [more flags]
set -euo pipefail
SHARDS=${SHARDS:?set SHARDS to an rpt-data tag output directory}
MODEL=${MODEL:?set MODEL to the policy (HF directory)}
DATA=${DATA:-$PWD/out/openrlhf-data}
SAVE=${SAVE:-$PWD/out/openrlhf-run}
GPUS=${GPUS:-8}
PREFIX=${RESPONSE_PREFIX:-}  # e.g. '\boxed{' with TEMPLATE=answer-only: prefilled into the rendered prompts
TEMPLATE=${TEMPLATE:-v0}
STEPS=${STEPS:-1000}
LIMIT=$((STEPS * 256 * ${GEN_BATCHES:-4}))  # 256 contexts per step, dynamic filtering draws more: export those only
MAX_NEW=${MAX_NEW_TOKENS:-8192}  # response tokens
MAX_LEN=${MAX_LEN:-10240}        # prompt + response tokens
# OpenRLHF keeps a prompt's last MAX_LEN - MAX_NEW ids (2048), cutting its BOS and template start off a longer one:
# contexts are cut to that budget less TEMPLATE_ROOM tokens for the template, BOS and response prefix (as verl's)
CONTEXT=$((MAX_LEN - MAX_NEW - ${TEMPLATE_ROOM:-512}))
if [ "$CONTEXT" -lt 1 ]; then
  echo "MAX_LEN ($MAX_LEN) leaves no room for a prompt beside MAX_NEW_TOKENS ($MAX_NEW) and TEMPLATE_ROOM" >&2; exit 2
fi

# 1. The samples `rpt-train run` would draw, with the chat template and any response prefix already rendered into
#    `input` (so: no --data.apply_chat_template below), labels and the reward settings as JSON in `label`.
rpt-train export --shards "$SHARDS" --model "$MODEL" --format openrlhf --out "$DATA" --bucket hard --limit "$LIMIT" \
    --heldout-fraction 0.01 --heldout-limit 1024 --template "$TEMPLATE" --response-prefix "$PREFIX" \
    --max-context-tokens "$CONTEXT" --overwrite

# 2. The reward file is loaded by path in OpenRLHF's rollout workers; env vars reach them through the runtime env:
#    the response prefix, and any RPT_REWARD_CORRECT / _WRONG / _NO_ANSWER or RPT_ANSWER_FORMAT set here (they
#    override the reward settings each exported label carries).
REWARD=$(python3 -c "import rpt_train.integrations.openrlhf as m; print(m.__file__)")
ENV=$(RPT_RESPONSE_PREFIX="$PREFIX" python3 -c "import json, os; from rpt_train.integrations import ENV_NAMES
print(json.dumps({'env_vars': {k: os.environ[k] for k in ENV_NAMES if k in os.environ}}))")
ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env-json="$ENV" -- \
  python3 -m openrlhf.cli.train_ppo_ray \
    --actor.model_name_or_path "$MODEL" \
    --actor.num_nodes 1 --actor.num_gpus_per_node "$GPUS" \
    --vllm.num_engines "$((GPUS / 2))" --vllm.tensor_parallel_size 2 --vllm.gpu_memory_utilization 0.6 \
    --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
    --reward.remote_url "$REWARD" \
    --data.prompt_dataset "$DATA/train.jsonl" --data.input_key input --data.label_key label \
    --eval.dataset "$DATA/heldout.jsonl" --eval.steps 50 --eval.n_samples_per_prompt 1 --eval.temperature 0.8 \
    --algo.advantage.estimator group_norm \
    --algo.kl.init_coef 0 \
    --algo.dynamic_filtering_enable --algo.dynamic_filtering_range 0 1 \
    --rollout.n_samples_per_prompt 8 --rollout.batch_size 256 --rollout.temperature 0.8 --rollout.top_p 1.0 \
    --rollout.max_new_tokens "$MAX_NEW" --data.max_len "$MAX_LEN" \
    --train.batch_size 2048 --train.micro_batch_size 1 --rollout.micro_batch_size 2 \
    --actor.adam.lr 1e-6 --actor.lr_warmup_ratio 0 --actor.lr_scheduler constant \
    --train.num_episodes 1 --train.max_epochs 1 --train.seed 0 \
    --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable --ds.packing_samples \
    --ckpt.save_steps 100 --ckpt.save_hf --ckpt.path "$SAVE/ckpt" --ckpt.output_dir "$SAVE" \
    --logger.tensorboard_dir "$SAVE/tensorboard" \
    "$@"

# 3. The paper's Table 1 columns on the saved HF model (--ckpt.output_dir; --ckpt.save_hf also writes HF copies
#    of intermediate checkpoints under --ckpt.path):
#   rpt-train eval --shards "$SHARDS" --model "$SAVE" --heldout-fraction 0.01 --limit 500 --samples 8 \
#       --max-new-tokens 8192 --max-context-tokens "$CONTEXT" --out "$SAVE/eval.json"
