"""bench/gpu.sh and its dry run (bench/gpu_dry_run.py) on CPU: the script parses, refuses unknown parts, and the
dry run fails for an import that neither the GPU machine's image nor the carried wheels provide, for a wheel whose
requirement is missing or whose bound the image breaks, for a wrong .whl/ and for a tree over 64 MiB; the real tree
passes (the whole check with .whl/ from `make gpu-wheels`, the import check against the wheel list without it)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_dry_run as dry  # noqa: E402
import gpu_summary  # noqa: E402

TABLE = {"numpy": ["numpy"], "trl": ["trl"], "polars": ["polars"], "yaml": ["PyYAML"], "torch": ["torch"],
         "pytest": ["pytest"]}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path):
    """A tiny project: a gpu-marked test importing a project module that imports trl lazily, a bench script."""
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "core.py", "import numpy\n\ndef f():\n    from trl import GRPOTrainer\n")
    write(tmp_path / "tests" / "conftest.py", "import torch\n")
    write(tmp_path / "tests" / "helper.py", "import yaml\n")
    write(tmp_path / "tests" / "test_a.py", "import pytest\nfrom pkg import core\nimport helper\n\n"
          "@pytest.mark.gpu\ndef test_x():\n    pass\n")
    write(tmp_path / "tests" / "test_cpu_only.py", "import polars\n")  # no gpu mark: not on the GPU path
    write(tmp_path / "bench" / "run.py", "import json\nfrom common import x\n"
          "try:\n    import flash_attn\nexcept ImportError:\n    flash_attn = None\n")
    write(tmp_path / "bench" / "common.py", "import os\nx = 1\n")
    write(tmp_path / "image.txt", "# the image\nnumpy==2.5.2\npyyaml\ntorch==2.11.0\npytest\n")
    write(tmp_path / "wheels.txt", "trl==1.16.0  # the baseline\n")
    return tmp_path


def run_check(root: Path, size=(1, 0), **kw):
    entries = kw.pop("entries", None) or dry.gpu_test_files(root) + [root / "bench" / "run.py"]
    lines = []
    problems = dry.check(root, image_file=root / "image.txt", wheel_file=root / "wheels.txt",
                         wheel_dir=root / ".whl", entries=entries, table=kw.pop("table", TABLE), size=size,
                         log=lines.append, **kw)
    return problems, "\n".join(lines)


def make_wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta + "\nthe description\n")
    return path


def test_the_gpu_path_resolves_from_image_plus_wheels(tree):
    problems, log = run_check(tree)
    assert problems == []
    assert "1 from wheels (trl)" in log and "optional import flash_attn" in log


def test_an_import_outside_image_and_wheels_fails_naming_file_and_line(tree):
    write(tree / "pkg" / "core.py", "import numpy\nimport polars\n")
    problems, _ = run_check(tree)
    assert len(problems) == 1 and "import polars (pkg/core.py:2)" in problems[0] and "polars" in problems[0]
    write(tree / "pkg" / "core.py", "import numpy\nimport notinstalled\n")
    problems, _ = run_check(tree)
    assert problems == ["import notinstalled (pkg/core.py:2): no installed distribution provides it here"]


def test_the_wheel_list_must_cover_lazy_imports(tree):
    write(tree / "wheels.txt", "")
    problems, _ = run_check(tree)
    assert len(problems) == 1 and "import trl (pkg/core.py:4)" in problems[0]


def test_wheels_are_checked_one_per_listed_version_and_by_their_requirements(tree):
    whl = tree / ".whl"
    make_wheel(whl, "trl", "1.16.0", ("numpy>=1.26", "pyyaml", "tomli; python_version < '3.11'",
                                      "rich; extra == 'cli'"))
    write(whl / "assets.tar.gz", "x")
    assert run_check(tree)[0] == []
    make_wheel(whl, "trl", "1.15.0")
    make_wheel(whl, "stray", "1.0")
    problems, _ = run_check(tree)
    assert any("trl==1.16.0 expected once, found ['1.15.0', '1.16.0']" in p for p in problems)
    assert any("stray 1.0 is not in bench/gpu-wheels.txt" in p for p in problems)
    for f in (whl / "trl-1.15.0-py3-none-any.whl", whl / "stray-1.0-py3-none-any.whl"):
        f.unlink()
    make_wheel(whl, "trl", "1.16.0", ("numpy>=9", "missingdep"))
    problems, _ = run_check(tree)
    assert sorted(problems) == ["wheel trl 1.16.0 requires 'missingdep', which is neither in the image nor in "
                                "bench/gpu-wheels.txt",
                                "wheel trl 1.16.0 requires 'numpy>=9' but the image has numpy 2.5.2"]
    (whl / "assets.tar.gz").unlink()
    make_wheel(whl, "trl", "1.16.0")
    assert run_check(tree)[0] == [".whl/assets.tar.gz is missing (the demo tokenizer and CHAMP); run `make gpu-wheels`"]


def test_the_carried_size_must_fit_64_mib(tree):
    assert run_check(tree, size=(60 * 2**20, 4 * 2**20))[0] == []
    problems, _ = run_check(tree, size=(60 * 2**20, 4 * 2**20 + 1))
    assert len(problems) == 1 and "over the device's 64 MiB" in problems[0]


def test_the_carried_size_counts_untracked_files_but_not_ignored_ones(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    write(tmp_path / ".gitignore", "ignored/\n.whl/\n")
    write(tmp_path / "kept.txt", "x" * 100)
    write(tmp_path / "ignored" / "big.bin", "x" * 10_000)
    write(tmp_path / ".whl" / "a.whl", "x" * 1000)
    assert dry.carried_bytes(tmp_path) == (100 + len("ignored/\n.whl/\n"), 1000)


def test_the_real_gpu_path_resolves():
    """Against the kept package list: with .whl/ (make gpu-wheels) everything, else the imports vs the wheel list."""
    lines = []
    problems = dry.check(log=lines.append)
    assert problems == [], "\n".join(problems + lines)
    names = {p.name for p in dry.gpu_test_files()}
    assert {"test_kernel.py", "test_train_rollout.py", "test_gpu.py", "test_train_plan_gpu.py"} <= names
    assert all((REPO / s).is_file() for s in dry.GPU_SCRIPTS)


def test_gpu_sh_parses_and_refuses_unknown_parts():
    script = REPO / "bench" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    out = subprocess.run([str(script), "--only", "pytest,nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown part 'nope'" in out.stderr
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--dry-run" in out.stdout
    for part in ("pytest", "kernel", "tag", "rollout", "step"):  # every part is run by name
        assert f"run_part {part} " in script.read_text()


def test_summary_records_each_part_and_junit_counts(tmp_path):
    summary = tmp_path / "s.json"
    summary.write_text('{"parts": {}}')
    junit = write(tmp_path / "p.xml", '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                  '<testcase classname="tests.test_gpu" name="test_a"><failure message="x"/></testcase>'
                  '<testcase classname="tests.test_gpu" name="test_b"/></testsuite></testsuites>')
    gpu_summary.main(["record", str(summary), "pytest", "--rc", "1", "--seconds", "5", "--limit", "90",
                      "--result", str(junit)])
    gpu_summary.main(["record", str(summary), "tag", "--rc", "124", "--seconds", "110", "--limit", "110",
                      "--result", str(tmp_path / "never-written.json")])
    import json

    parts = json.loads(summary.read_text())["parts"]
    assert parts["pytest"] | {} == {"rc": 1, "passed": False, "timed_out": False, "seconds": 5, "limit_s": 90,
                                    "result": "p.xml", "tests": 3, "failures": 1, "errors": 0, "skipped": 1,
                                    "failed": ["tests.test_gpu::test_a"]}
    assert parts["tag"]["timed_out"] and parts["tag"]["result"] is None


def test_each_benchmark_command_of_gpu_sh_parses_with_its_own_options():
    """The command lines gpu.sh hands to bench/tag.py, rollout.py and step.py are accepted by their parsers (a
    renamed option would otherwise be found on the device only); step's TRL shape is one of its shapes."""
    import importlib
    import re
    import shlex

    text = (REPO / "bench" / "gpu.sh").read_text().replace("\\\n", " ")
    found = {}
    for m in re.finditer(r'"\$PY" bench/(tag|rollout|step)\.py ([^\n]*)', text):
        argv = shlex.split(re.sub(r"\$\{GPU_ARGS_\w+:-\}", "", m.group(2)))
        found[m.group(1)] = importlib.import_module(m.group(1)).parser().parse_args(argv)
    assert found.keys() == {"tag", "rollout", "step"}
    assert found["tag"].preset == found["rollout"].preset == "gpu"
    step = importlib.import_module("step")
    assert set(step.parse_shapes(found["step"].trl_shape)) <= set(step.parse_shapes(found["step"].shapes))
    assert (1024, 16) in {(c, g) for c, _, g in step.parse_shapes(found["step"].trl_shape)}


@pytest.mark.slow
def test_gpu_sh_plumbing_on_cpu(tmp_path):
    """The whole script on a CPU with GPU_PLUMBING_ON_CPU=1 (about a minute): every part runs under its limit (the
    GPU tests skip, the benchmarks refuse the missing device), a part whose limit is under 20 s is not started, and
    $OUT gets the log, the JUnit file and a summary naming all five parts: at most the device's 8 files."""
    import json
    import os

    out, empty = tmp_path / "out", tmp_path / "no-wheels"
    out.mkdir()
    empty.mkdir()
    env = dict(os.environ, OUT=str(out), GPU_WORK=str(tmp_path / "work"), GPU_WHEELS=str(empty),
               GPU_PLUMBING_ON_CPU="1", GPU_PYTHON=sys.executable, GPU_T_TAG="5")
    proc = subprocess.run([str(REPO / "bench" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu-cpu-plumbing.log", "gpu-summary-cpu-plumbing.json", "pytest-gpu-cpu-plumbing.xml"]
    parts = json.loads((out / "gpu-summary-cpu-plumbing.json").read_text())["parts"]
    assert list(parts) == ["pytest", "kernel", "tag", "rollout", "step"]
    assert parts["pytest"]["passed"] and parts["pytest"]["tests"] == parts["pytest"]["skipped"] > 0
    assert parts["tag"]["limit_s"] == 0 and not any(parts[p]["passed"] for p in ("kernel", "rollout", "step"))
