"""Docs that cannot rot: every `rpt-data` / `rpt-train` command shown in README.md and docs/*.md parses (and its
config builds) with the CLI as typed, every relative link resolves, and docs/cli.md is the commands' `--help`.

Regenerate docs/cli.md after changing an option: `.venv/bin/python tests/test_docs.py`."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI_MD = ROOT / "docs" / "cli.md"
FENCE = re.compile(r"^[ \t]*```([^\n]*)\n(.*?)^[ \t]*```", re.M | re.S)
SHELL = {"", "bash", "sh", "shell", "console"}  # code blocks whose commands are checked (not ```text, ```python)
PROGRAMS = {"rpt-data": "rpt_data.cli", "rpt-train": "rpt_train.cli"}
WIDTH = 100  # --help rendered at this width in docs/cli.md
EXPLAINED = {  # the manual page that explains each subcommand, linked from its section of docs/cli.md
    "rpt-data tag": "data.md", "rpt-data prefix-study": "data.md#how-much-prefix-measured-rpt-data-prefix-study",
    "rpt-data inspect": "shards.md#rpt-data-inspect-and-rpt-data-validate",
    "rpt-data validate": "shards.md#rpt-data-inspect-and-rpt-data-validate",
    "rpt-data merge": "scale.md#multi-rank-tagging", "rpt-train run": "training.md",
    "rpt-train eval": "training.md#rpt-train-eval",
    "rpt-train plan": "scale.md#memory-at-the-papers-scale-rpt-train-plan-rpt_trainlogprobspy-rpt_trainplanpy",
    "rpt-train export": "engines.md",
    "rpt-train experiment": "experiments.md",
}


def groups() -> dict[str, click.Group]:
    import rpt_data.cli
    import rpt_train.cli

    return {"rpt-data": rpt_data.cli.main, "rpt-train": rpt_train.cli.main}


# ---- docs/cli.md: generated from the click commands' help -------------------------------------------------------

SIZE = {"terminal_width": WIDTH, "max_content_width": WIDTH}


def render_cli() -> str:
    """docs/cli.md: every subcommand's `--help`, as click prints it at WIDTH columns."""
    out = ["# Command-line reference", "",
           "Every option of every subcommand, exactly as `--help` prints it (generated from the click commands by",
           "`.venv/bin/python tests/test_docs.py`; `tests/test_docs.py` fails when this page and `--help` differ).",
           "The pages of [the manual](../README.md#the-manual-docs) explain what the options do.", ""]
    sections = []
    for prog, group in groups().items():
        for name in group.list_commands(None):
            sections.append((prog, name, group.get_command(None, name)))
    out += [f"- [`{prog} {name}`](#{prog}-{name})" for prog, name, _ in sections] + [""]
    for prog, name, cmd in sections:
        # The contexts the commands really run in (their context_settings: `-h`): click caches each command's help
        # option from the first context that asks, so a bare Context here would leak `--help`-only into other tests.
        group = groups()[prog]
        parent = click.Context(group, info_name=prog, **{**group.context_settings, **SIZE})
        ctx = click.Context(cmd, info_name=name, parent=parent, **{**cmd.context_settings, **SIZE})
        out += [f"## {prog} {name}", ""]
        target = EXPLAINED.get(f"{prog} {name}")
        if target:
            out += [f"Explained in [{target.split('#')[0]}]({target}).", ""]
        out += ["```text", cmd.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(out)


def test_cli_reference_matches_help():
    commands = {f"{prog} {name}" for prog, group in groups().items() for name in group.list_commands(None)}
    assert commands == set(EXPLAINED), "every subcommand has a page of the manual that explains it (EXPLAINED)"
    assert CLI_MD.read_text() == render_cli(), (
        "docs/cli.md differs from the commands' --help: regenerate it with `.venv/bin/python tests/test_docs.py`")
    from click.testing import CliRunner

    for prog, group in groups().items():  # rendering the page must not change what the commands accept
        for name in group.list_commands(None):
            result = CliRunner().invoke(group, [name, "-h"])
            assert result.exit_code == 0 and "Options:" in result.output, (prog, name, result.output)


# ---- commands in code blocks ------------------------------------------------------------------------------------

def shell_words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def commands_in(words: list[str]) -> list[tuple[str, list[str]]]:
    """(program, args) of each rpt-data / rpt-train invocation in one shell line's words: the console scripts
    (any path prefix, e.g. .venv/bin/rpt-data), `-m rpt_data.cli` under python or torchrun, and quoted commands
    (e.g. `sbatch --wrap "rpt-data merge OUT"`)."""
    found = []
    for i, w in enumerate(words):
        prog = next((p for p, mod in PROGRAMS.items()
                     if w.rsplit("/", 1)[-1] == p or (w == mod and i and words[i - 1] == "-m")), None)
        if prog:
            args = []
            for a in words[i + 1:]:
                if a and set(a) <= set(";&|<>()"):  # a shell operator ends the command
                    break
                args.append(a)
            found.append((prog, args))
        elif " " in w and any(p in w for p in PROGRAMS):
            found += commands_in(shell_words(w))
    return found


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(where, program, args) for every command in the code blocks of README.md and docs/*.md."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.finditer(text):
            if block.group(1).strip() not in SHELL:
                continue
            first_line = text[:block.start()].count("\n") + 2
            lines = block.group(2).split("\n")
            k = 0
            while k < len(lines):  # join `\` continuations
                start, line = k, lines[k]
                while line.endswith("\\") and k + 1 < len(lines):
                    k += 1
                    line = line[:-1] + " " + lines[k]
                k += 1
                if any(p in line for p in (*PROGRAMS, *PROGRAMS.values())) and not line.lstrip().startswith("#"):
                    where = f"{page.relative_to(ROOT)}:{first_line + start}"
                    found += [(where, prog, args) for prog, args in commands_in(shell_words(line))]
    return found


class Parsed(Exception):
    """Raised in place of the command's work: options parsed and the config built."""


@pytest.fixture
def dry_commands(monkeypatch):
    """Every subcommand runs as typed up to its work (tagging, training, loading a model), which is replaced by
    raising Parsed: so click's parsing, the recipe and the config's own checks all run, and nothing else."""
    import rpt_data.cli
    import rpt_data.inspect
    import rpt_data.merge
    import rpt_data.pipeline
    import rpt_data.study
    import rpt_train.cli
    import rpt_train.experiment
    import rpt_train.export
    import rpt_train.plan
    import rpt_train.policy
    import rpt_train.runner
    import rpt_train.trainer

    def stop(*args, **kwargs):
        raise Parsed()

    for module, name in [(rpt_data.pipeline, "run_tag"), (rpt_data.study, "run_study"),
                         (rpt_data.inspect, "inspect_out"), (rpt_data.inspect, "validate_out"),
                         (rpt_data.merge, "merge_out"), (rpt_train.trainer, "train"), (rpt_train.export, "export"),
                         (rpt_train.runner, "run_experiment"),
                         (rpt_train.policy, "load_policy"), (rpt_train.plan, "load_shapes"),
                         (rpt_data.cli, "_quiet_transformers"), (rpt_train.cli, "_quiet_transformers")]:
        monkeypatch.setattr(module, name, stop if name != "_quiet_transformers" else lambda: None)
        for cli in (rpt_data.cli, rpt_train.cli):  # also where a CLI module imported the function at the top
            if name != "_quiet_transformers" and hasattr(cli, name):
                monkeypatch.setattr(cli, name, stop)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)
    return groups()


def test_doc_commands_parse(dry_commands):
    commands = doc_commands()
    assert len(commands) >= 20, f"only {len(commands)} commands found in README.md and docs/"
    runner = CliRunner()
    failures = []
    for where, prog, args in commands:
        result = runner.invoke(dry_commands[prog], args, prog_name=prog)
        if not isinstance(result.exception, Parsed) and result.exit_code != 0:
            why = (result.output.strip().splitlines() or [repr(result.exception)])[-1]
            failures.append(f"{where}: {prog} {shlex.join(args)}\n    -> {why}")
    assert not failures, "commands in the docs that do not run as typed:\n" + "\n".join(failures)


def test_command_collection():
    """The collector sees through continuations, comments, torchrun/-m, paths and quoted commands."""
    assert commands_in(shell_words(".venv/bin/rpt-data tag pipelines/demo.yaml  # the demo")) == [
        ("rpt-data", ["tag", "pipelines/demo.yaml"])]
    assert commands_in(shell_words("torchrun --nproc-per-node 8 -m rpt_train.cli run x.yaml --out o && ls")) == [
        ("rpt-train", ["run", "x.yaml", "--out", "o"])]
    assert commands_in(shell_words('sbatch --wrap "rpt-data merge out/web"')) == [("rpt-data", ["merge", "out/web"])]
    assert commands_in(shell_words("make demo")) == []


def test_a_wrong_command_fails(dry_commands):
    """The check is not vacuous: an unknown option, a bad choice and a config the CLI refuses all fail."""
    runner = CliRunner()
    for prog, args in [("rpt-data", ["tag", "--input", "x", "--out", "o", "--no-such-option", "1"]),
                       ("rpt-data", ["tag", "--input", "x", "--out", "o", "--metric", "max"]),
                       ("rpt-data", ["tag", "--input", "x", "--out", "o", "--window", "8", "--context-prefix", "8"]),
                       ("rpt-train", ["run", "--shards", "s", "--temperature", "0"]),
                       ("rpt-train", ["nosuchcommand"])]:
        result = runner.invoke(dry_commands[prog], args, prog_name=prog)
        assert not isinstance(result.exception, Parsed) and result.exit_code != 0, (prog, args)
    ok = runner.invoke(dry_commands["rpt-data"], ["tag", "--input", "x", "--out", "o"], prog_name="rpt-data")
    assert isinstance(ok.exception, Parsed), ok.output


def test_python_blocks_import_what_exists():
    """Every ```python block parses, and every `from rpt_... import name` in it names something that exists."""
    import ast
    import importlib

    missing = []
    for page in PAGES:
        for block in FENCE.finditer(page.read_text()):
            if block.group(1).strip() != "python":
                continue
            tree = ast.parse(block.group(2))  # a SyntaxError names the block's line
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rpt_"):
                    module = importlib.import_module(node.module)
                    missing += [f"{page.relative_to(ROOT)}: {node.module}.{a.name}"
                                for a in node.names if not hasattr(module, a.name)]
    assert not missing, "names the docs import that do not exist:\n" + "\n".join(missing)


# ---- links ------------------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        prose = FENCE.sub("", page.read_text())
        for target in LINK.findall(prose):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_the_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= linked, "every docs/ page is linked from README.md"


# ---- one declaration of the proxy options -----------------------------------------------------------------------

def test_tag_and_prefix_study_share_the_proxy_options():
    import rpt_data.cli

    def options(cmd):
        return {p.name: (p.opts, p.help, getattr(p.type, "choices", p.type)) for p in cmd.params}

    tag, study = options(rpt_data.cli.tag), options(rpt_data.cli.prefix_study)
    shared = ["model", "top_k", "metric", "select_above", "buckets", "batch_tokens", "device", "dtype"]
    for name in shared:
        assert tag[name] == study[name], name


if __name__ == "__main__":
    CLI_MD.write_text(render_cli())
    print(f"wrote {CLI_MD.relative_to(ROOT)}", file=sys.stderr)


PLAN_BASE = ["plan", "--max-new-tokens", "8192", "--batch-prompts", "256", "--group-size", "8", "--micro-batch-size",
             "1", "--logprob-chunk-tokens", "1024", "--device-memory", "80", "--json"]
PLAN_ROWS = {  # docs/scale.md "What fits on one 80 GB GPU": row (policy, options) -> the plan's options
    ("Qwen2-1.5B-like (1.54B, V = 151,936)", "`--rollout-batch-size 64`"):
        ["--model", "bench/configs/qwen2-1.5b", "--rollout-batch-size", "64"],
    ("Qwen2-1.5B-like", "`--rollout-batch-size 64`, `--gradient-checkpointing`"):
        ["--model", "bench/configs/qwen2-1.5b", "--rollout-batch-size", "64", "--gradient-checkpointing"],
    ("Qwen2-1.5B-like", "all 2048 rollouts in one generate call (default `--rollout-batch-size 0`)"):
        ["--model", "bench/configs/qwen2-1.5b"],
    ("14B-like (14.8B)", "`--gradient-checkpointing`, `--rollout-batch-size 8`, 1 GPU"):
        ["--model", "bench/configs/qwen2.5-14b", "--gradient-checkpointing", "--rollout-batch-size", "8"],
    ("14B-like", "`--gradient-checkpointing`, `--rollout-batch-size 16`, FSDP over 4 GPUs"):
        ["--model", "bench/configs/qwen2.5-14b", "--gradient-checkpointing", "--rollout-batch-size", "16",
         "--world-size", "4"],
    ("14B-like", "`--gradient-checkpointing`, `--rollout-batch-size 16`, FSDP over 8 GPUs"):
        ["--model", "bench/configs/qwen2.5-14b", "--gradient-checkpointing", "--rollout-batch-size", "16",
         "--world-size", "8"],
    ("14B-like", "`--gradient-checkpointing`, `--rollout-batch-size 32`, FSDP over 8 GPUs"):
        ["--model", "bench/configs/qwen2.5-14b", "--gradient-checkpointing", "--rollout-batch-size", "32",
         "--world-size", "8"],
}


def test_the_memory_table_in_scale_md_is_the_plans():
    """Every row of docs/scale.md's "what fits" table is what `rpt-train plan` says today (peak and verdict), so the
    table follows the precision policy and the plan's model instead of drifting from them."""
    import json

    import rpt_train.cli

    text = (ROOT / "docs" / "scale.md").read_text()
    rows = re.findall(r"^\| (.+?) \| (.+?) \| ([\d.]+) GiB \| (yes|no)[^|]*\|$", text, re.M)
    assert {(p, o) for p, o, _, _ in rows} == set(PLAN_ROWS)
    for policy, options, peak, fits in rows:
        result = CliRunner().invoke(rpt_train.cli.main, PLAN_BASE + PLAN_ROWS[(policy, options)])
        plan = json.loads(result.output.strip().splitlines()[-1])
        assert f"{plan['total_bytes'] / 2**30:.1f}" == peak, (policy, options)
        assert plan["fits"] == (fits == "yes"), (policy, options)


# ---- training commands fit the devices they name (issue 36) -----------------------------------------------------

FITS = re.compile(r"#\s*plan: fits (\d+) x (\d+) GB(?:, shards tagged with --window (\d+))?")
STANDIN = {"/models/Qwen2-1.5B": "bench/configs/qwen2-1.5b", "/models/Qwen2.5-7B": "bench/configs/qwen2.5-7b"}


def planned_commands() -> list[tuple[str, list[str], tuple[int, int, int | None]]]:
    """(where, `rpt-train run` args, (GPUs, GB each, shard window)) for every shell line in README/docs marked
    `# plan: fits W x G GB[, shards tagged with --window N]` on the line before it."""
    found = []
    for page in PAGES:
        lines = page.read_text().split("\n")
        for i, line in enumerate(lines):
            m = FITS.search(line)
            if not m:
                continue
            k, cmd = i + 1, lines[i + 1]
            while cmd.endswith("\\"):
                k += 1
                cmd = cmd[:-1] + " " + lines[k]
            runs = [a for prog, a in commands_in(shell_words(cmd)) if prog == "rpt-train" and a[:1] == ["run"]]
            assert runs, f"{page.name}:{i + 1}: a `# plan: fits` mark not followed by an `rpt-train run` command"
            found.append((f"{page.name}:{i + 2}", runs[0][1:],
                          (int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None)))
    return found


def test_training_commands_fit_the_devices_they_name(tmp_path):
    """Each marked training command, planned by `rpt-train plan` with its own options (the model's shapes from
    bench/configs/, the prompt bound from the shards' window), fits W GPUs of G GB; and every training command on a
    real-size model carries such a mark."""
    import json

    import rpt_train.cli

    marked = planned_commands()
    assert len(marked) >= 3
    for where, args, (gpus, gb, window) in marked:
        args = [STANDIN.get(a, a) for a in args]
        extra = ["--world-size", str(gpus), "--device-memory", str(gb), "--json"]
        if window:
            extra += ["--prompt-tokens", str(window + 128)] if "--max-context-tokens" not in args else []
        result = CliRunner().invoke(rpt_train.cli.main, ["plan", *args, *extra])
        plan = json.loads(result.output.strip().splitlines()[-1])
        assert plan["fits"] is True, (where, f"{plan['total_bytes'] / 2**30:.1f} GiB per GPU")
    real = [(w, a) for w, prog, a in doc_commands() if prog == "rpt-train" and a[:1] == ["run"]
            and any(x in STANDIN for x in a)]
    assert {w.rsplit(":", 1)[0].split("/")[-1] for w, _ in real} <= {w.split(":")[0] for w, _, _ in marked}
    assert len(real) <= len(marked), [w for w, _ in real]
