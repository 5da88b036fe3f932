"""RPT with TRL's GRPOTrainer (checked against trl 1.16) on a `rpt-train export --format trl` directory, with the
paper's hyperparameters as defaults (G=8, T=0.8, lr 1e-6, no KL, 8k completions, 256 contexts per step on 8 GPUs).

    rpt-train export --shards out/tagged --model MODEL --format trl --out out/trl-data --bucket hard \
        --heldout-fraction 0.01 --heldout-limit 512 --limit 256000
    accelerate launch --num_processes 8 pipelines/trl_grpo.py --data out/trl-data --model_name MODEL \
        --output_dir out/trl-run
    rpt-train eval --shards out/tagged --model out/trl-run/checkpoint-1000 --heldout-fraction 0.01 --out eval.json

Every GRPOConfig field is a flag (`--max_steps 2 --use_vllm false ...`). TRL has no dynamic sampling (DAPO's
refill of zero-variance groups): those groups simply get zero advantage; `frac_reward_zero_std` shows how many.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset
from transformers import AutoTokenizer, HfArgumentParser
from trl import GRPOConfig, GRPOTrainer

from rpt_train.integrations.trl import make_rpt_reward

# 256 contexts x G=8 = 2048 completions per generation batch = 8 GPUs x 16 per device x 16 accumulation steps
PAPER = dict(num_generations=8, temperature=0.8, top_p=1.0, learning_rate=1e-6, beta=0.0, max_completion_length=8192,
             per_device_train_batch_size=16, gradient_accumulation_steps=16, loss_type="grpo", scale_rewards="group",
             lr_scheduler_type="constant", warmup_steps=0, max_steps=1000, save_steps=100, logging_steps=1,
             bf16=True, gradient_checkpointing=True, use_vllm=True, vllm_mode="colocate",
             vllm_gpu_memory_utilization=0.4, chat_template_kwargs={"enable_thinking": True}, report_to="tensorboard",
             eval_strategy="steps", eval_steps=50, per_device_eval_batch_size=16)


@dataclass
class Script:
    data: str = field(metadata={"help": "`rpt-train export --format trl` output directory"})
    model_name: str = field(metadata={"help": "policy: HF model directory (the one the export was made for)"})
    reward_correct: float | None = field(default=None, metadata={"help": "default: the export's (1)"})
    reward_wrong: float | None = field(default=None, metadata={"help": "default: the export's (0)"})
    reward_no_answer: float | None = field(default=None, metadata={"help": "default: the export's (0)"})


def main() -> None:
    parser = HfArgumentParser((Script, GRPOConfig))
    parser.set_defaults(**PAPER)
    script, args = parser.parse_args_into_dataclasses()
    data = Path(script.data)
    meta = json.loads((data / "export.json").read_text())
    if meta["format"] != "trl":
        raise SystemExit(f"'{data}' is a --format {meta['format']} export; export again with --format trl")
    files = {split: str(data / f["file"]) for split, f in meta["files"].items() if f["rows"]}
    dataset = load_dataset("parquet", data_files=files)
    if "heldout" not in dataset:
        args.eval_strategy = "no"
    tokenizer = AutoTokenizer.from_pretrained(script.model_name)
    # completions decoded after their prompt with the policy's tokenizer, as `rpt-train run` decodes them
    reward = make_rpt_reward(script.reward_correct, script.reward_wrong, script.reward_no_answer, tokenizer=tokenizer)
    trainer = GRPOTrainer(model=script.model_name, reward_funcs=[reward], args=args, train_dataset=dataset["train"],
                          eval_dataset=dataset.get("heldout"), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
