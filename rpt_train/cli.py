"""`rpt-train run` and `rpt-train eval`: every config field is an option (same name as in a recipe YAML);
the command line overrides the recipe, the recipe overrides the defaults in rpt_train/config.py."""
from __future__ import annotations

import dataclasses
import functools
import os
import traceback
import typing

import click

from rpt_common.errors import user_errors
from rpt_train.config import EvalConfig, ExportConfig, TrainConfig, _base, field_types, load_config


def config_options(cls):
    """One click option per dataclass field, default None so that only what the user typed overrides."""
    types_ = field_types(cls)

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            base, _ = _base(types_[f.name])
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_ = f.metadata.get("help", "") + ("" if shown in ("", None) else f" [default: {shown}]")
            if base is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_)(fn)
            elif typing.get_origin(base) is list and typing.get_args(base)[0] is str:
                fn = click.option(flag, f.name, multiple=True, help=help_)(fn)
            elif typing.get_origin(base) is list:
                fn = click.option(flag, f.name, type=str, default=None, help=help_ + " (comma-separated)")(fn)
            else:
                fn = click.option(flag, f.name, type=base, default=None, help=help_)(fn)
        return fn

    return decorate


def ends_rank(fn):
    """Decorator for the commands that run under torchrun (`run`, `eval`): a rank's process ends with the exit code
    it would have had (0, a UserError's, 130 after Ctrl-C, 1 after a traceback) through distributed.end_process,
    without interpreter finalization, where gloo's worker threads could abort it (SIGABRT). Outside torchrun,
    nothing changes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rpt_train import distributed

        try:
            fn(*args, **kwargs)
        except BaseException as e:
            if not distributed.joined():
                raise
            if isinstance(e, SystemExit):  # user_errors' message is out; a str code is printed as Python would
                if isinstance(e.code, str):
                    click.echo(e.code, err=True)
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            elif isinstance(e, click.exceptions.Exit):
                code = e.exit_code
            elif isinstance(e, click.ClickException):
                e.show()
                code = e.exit_code
            elif isinstance(e, (KeyboardInterrupt, click.Abort)):  # `eval` has no handler of its own: as click says
                click.echo("Aborted!", err=True)
                code = 130 if isinstance(e, KeyboardInterrupt) else 1
            else:
                traceback.print_exc()
                code = 1
            distributed.end_process(code)
        distributed.end_process(0)

    return wrapper


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Reinforcement Pre-Training on prebuilt `rpt-data tag` shards: train (`run`) and evaluate (`eval`)."""


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@config_options(TrainConfig)
@ends_rank
@user_errors
def run(recipe, **overrides):
    """Train a policy with RPT (GRPO family); writes OUT/metrics.jsonl, samples.jsonl and checkpoints/."""
    from rpt_train.trainer import train

    cfg = load_config(TrainConfig, recipe, overrides)
    _quiet_transformers()
    try:
        out = train(cfg)
    except KeyboardInterrupt:
        interrupted(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once
        click.echo(f"done: {out}")


def interrupted(cfg: TrainConfig) -> typing.NoReturn:
    """Ctrl-C during `run`: say where the run can go on from (rank 0 only), exit 130."""
    from rpt_train.checkpoint import latest_checkpoint

    if int(os.environ.get("RANK", "0")) == 0:
        last = latest_checkpoint(cfg.out)
        where = (f"its last checkpoint '{last}'" if last else
                 f"step 0 (no checkpoint yet: one is saved every --save-every {cfg.save_every} steps)")
        click.echo(f"\ninterrupted: rerun the same command with --resume to continue '{cfg.out}' from {where}",
                   err=True)
    raise SystemExit(130)


@main.command("eval")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@config_options(EvalConfig)
@ends_rank
@user_errors
def eval_cmd(recipe, **overrides):
    """Next-token-reasoning accuracy per entropy bucket (easy/medium/hard/all), printed and saved as JSON.

    Cost: up to --limit positions per bucket (the buckets share positions), each with --samples sampled and one
    greedy completion of up to --max-new-tokens tokens (--think-overflow close: --think-budget + --answer-room,
    a thought cut at the budget closed by force and answered). With the defaults below (the paper's 8k-token budget) that
    takes hours on a CPU; try --limit 8 --samples 1 --max-new-tokens 256 first. A progress bar (a line every 30 s
    when stderr is not a terminal) shows the positions done.

    Under torchrun every rank scores a stripe of the positions with its own copy of the model (the result equals
    one process's). --baseline MODEL scores a second model on the same positions with the same prompt and adds
    the paired differences (interval, p-value) to the table and JSON. Given a `rpt-train run` directory as
    --model, eval keeps the run's held-out split and prompt options (template, chat template, response prefix,
    context cut, answer format) and generates as its own --eval-every evals did, what its last step generated
    (--think-overflow, --think-close, --answer-room; close: --think-budget = its last budget; fail:
    --max-new-tokens = that + --answer-room, or the run's without a budget), unless given here or in the recipe's eval: section; a recipe's
    top-level options are read as `run` reads them (a decaying budget: its last value).
    """
    from rpt_train.compare import run_eval
    from rpt_train.evaluate import write_json

    cfg = load_config(EvalConfig, recipe, overrides)
    _quiet_transformers()
    result = run_eval(cfg)
    if result is not None and cfg.out:  # rank 0
        write_json(result, cfg.out)
        click.echo(f"wrote {cfg.out}")


@main.command("plan")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--world-size", "world_size", type=int, default=1, help="FSDP ranks sharing weights, AdamW, gradients")
@click.option("--prompt-tokens", "prompt_tokens", type=int, default=None,
              help="planned prompt length [default: --max-context-tokens + 128, else the --shards' window + 128 "
              "(the window times the worst policy/proxy tokens ratio of up to 256 sampled rows when the policy's "
              "tokenizer is not the shards'), else 1024]")
@click.option("--json", "as_json", is_flag=True, help="print the plan as one JSON object on the last line")
@config_options(TrainConfig)
@user_errors
def plan_cmd(recipe, world_size, prompt_tokens, as_json, **overrides):
    """Planned peak memory per device of `run` with these options, from the model's config alone (no weights
    loaded); exit 2 when it does not fit --device-memory (or the CUDA device's own memory; with --device cpu this
    machine's memory). Without a device size (--device auto/cuda on a machine without that GPU) the verdict is
    "unknown", never "fits"."""
    import json

    from rpt_train import plan

    overrides["shards"] = overrides.get("shards") or "(unused by plan)"
    cfg = load_config(TrainConfig, recipe, overrides)
    _quiet_transformers()
    target = "cpu" if cfg.device == "cpu" else "cuda"  # --device auto plans for the GPU a run is meant for
    size, source = plan.device_memory(cfg, cfg.device if target == "cuda" else "cpu")
    memory = plan.plan_memory(cfg, plan.load_shapes(cfg.model), world_size=world_size, device_type=target,
                              device_bytes=size, device_source=source, prompt_tokens=prompt_tokens)
    click.echo(plan.render(memory))
    if memory.fits is False:
        click.echo(f"error: {plan.refusal(memory)}", err=True)
    if as_json:
        click.echo(json.dumps(memory.to_json()))
    if memory.fits is False:
        raise SystemExit(2)


@main.command("export")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@config_options(ExportConfig)
@user_errors
def export_cmd(recipe, **overrides):
    """Write the samples `run` would draw as a verl, TRL or OpenRLHF dataset (train and held-out files apart)."""
    from rpt_common.errors import UserError
    from rpt_train.export import export

    if not overrides.get("out"):  # a recipe's `out:` is the training run's directory, not the export's
        raise UserError("rpt-train export needs --out DIR on the command line")
    cfg = load_config(ExportConfig, recipe, overrides)
    from rpt_train.export import uncarried

    for warning in uncarried(recipe):
        click.echo(f"warning: {warning}", err=True)
    _quiet_transformers()
    meta = export(cfg)
    for split, f in meta["files"].items():
        click.echo(f"{split}: {f['rows']} samples -> {os.path.join(cfg.out, f['file'])} ({f['skipped']} skipped)")


@main.command("experiment")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("arms", nargs=-1)
@click.option("--report-only", is_flag=True, help="write the report from the arms finished so far; run nothing")
@click.option("--rerun", is_flag=True, help="run the named ARMs over (their kept records and work directories go, unless written since this "
              "process started: by another process of this round, whose record then counts)")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
@user_errors
def experiment_cmd(spec, arms, report_only, rerun, threads):
    """Run an experiment described as data (docs/experiments.md): every arm of SPEC, or the ARMs named, each
    trained by its kind and evaluated on the same held-out positions, then the report RESULTS/NAME.{json,md,png}.
    ARM `levers`: the spec's levers stage only (what the policy knows before training).

    A finished arm (its record in RESULTS/NAME.arms/ARM.json) is not rerun (a record evaluated otherwise than the
    spec now says is refused: --rerun it); a training arm stopped half-way resumes from its last checkpoint. Arms
    that depend on another (match_flops, contexts_of) run after it. An arm another process is running (its lock
    OUT/ARM.lock) is skipped: start the same command once per GPU to share the arms out.
    """
    import torch

    from rpt_train import experiment, runner

    if rerun and not arms:
        raise click.UsageError("--rerun needs the ARMs to run over")
    experiment.single_process()  # under torchrun: refused before anything loads
    experiment.exit_on_sigterm()  # scancel / a time limit: its locks released (finally), not left behind
    loaded = experiment.load_spec(spec)
    asked = experiment.stages(loaded, list(arms))[1]
    if asked != []:
        experiment.Experiment(loaded).order(asked)  # the spec and the arms asked checked before anything runs
    if threads:
        torch.set_num_threads(threads)
    _quiet_transformers()
    runner.run_experiment(spec, list(arms) or None, report_only=report_only, rerun=rerun)


if __name__ == "__main__":  # `torchrun ... -m rpt_train.cli run ...`
    main()
