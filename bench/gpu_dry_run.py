"""`bench/gpu.sh --dry-run`: checks on CPU that bench/gpu.sh can run on the lent GPU machine, which reaches no
package registry. Exit 0 when all hold, 1 with one line per problem otherwise:

* every import of the GPU path (the test files with a `gpu` mark and what they import, the benchmark scripts
  gpu.sh runs, and every project module they reach, imports inside functions included) resolves to the standard
  library, the project, the machine's image (bench/gpu-image-packages.txt) or a carried wheel
  (bench/gpu-wheels.txt); imports under `try: ... except ImportError` are optional and only reported;
* each listed wheel's own requirements (no extras, Python 3.12 on Linux) are in the image or the wheel list, and
  their version bounds hold for the image versions the package list gives;
* with `.whl/` present (`make gpu-wheels`): exactly one wheel per listed name==version and none unlisted;
* the carried size (tracked + untracked-not-ignored files + `.whl/`) is under the device's 64 MiB.

Import names map to distributions through this interpreter's installed metadata (the project's .venv has every
distribution of the GPU path), so run it with the .venv's python.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20
# What gpu.sh runs besides `pytest -m gpu` (keep in step with bench/gpu.sh).
GPU_SCRIPTS = ("bench/gpu_assets.py", "bench/gpu_summary.py", "bench/kernel.py", "bench/tag.py", "bench/rollout.py", "bench/step.py")
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_packages(path: Path) -> dict[str, str | None]:
    """`name` / `name==version` lines (comments and blanks skipped) -> {normalised name: version or None}."""
    out: dict[str, str | None] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+))?", line)
        if not m:
            raise SystemExit(f"{path}:{lineno}: expected `name` or `name==version`, got {raw!r}")
        out[norm(m.group(1))] = m.group(2)
    return out


@dataclass
class Found:
    required: dict[str, list[str]] = field(default_factory=dict)  # top-level import name -> ["file:line", ...]
    optional: dict[str, list[str]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # project files walked


def _catches_import_error(node: ast.Try) -> bool:
    for h in node.handlers:
        names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
        if h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError",
                                                                       "Exception") for n in names):
            return True
    return False


def imports_of(path: Path) -> list[tuple[str, int, int, bool, list[str]]]:
    """(module, level, line, optional, imported names) for every import statement and `importorskip` call."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []

    def visit(node, optional: bool):
        if isinstance(node, ast.Try):
            opt = optional or _catches_import_error(node)
            for child in node.body:
                visit(child, opt)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, optional)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, 0, node.lineno, optional, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level, node.lineno, optional, [a.name for a in node.names]))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, 0, node.lineno, True, []))
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(tree, False)
    return out


def _module_file(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split(".")) if dotted else root
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def resolve_local(path: Path, module: str, level: int, names: list[str], repo: Path) -> list[Path] | None:
    """Project files an import executes, or None when it is not a project import. Scripts in bench/ and tests/
    put their own directory on sys.path, so their siblings import by bare name."""
    if level:
        pkg = path.parent
        for _ in range(level - 1):
            pkg = pkg.parent
        roots, dotted = [pkg], module
    else:
        roots, dotted = [repo] + ([path.parent] if path.parent != repo else []), module
    for root in roots:
        parts = dotted.split(".") if dotted else []
        hits = []
        for i in range(1, len(parts) + 1):  # packages on the way run their __init__
            f = _module_file(root, ".".join(parts[:i]))
            if f is None:
                break
            hits.append(f)
        else:
            for n in names:  # `from pkg import submodule`
                f = _module_file(root, ".".join(parts + [n]))
                if f is not None:
                    hits.append(f)
            if hits or level:
                return hits
    return None


def walk(entries: list[Path], repo: Path = REPO) -> Found:
    """Every external top-level import reached from `entries` through project files."""
    found, seen, todo = Found(), set(), [p.resolve() for p in entries]
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        found.files.append(path)
        for module, level, line, optional, names in imports_of(path):
            local = resolve_local(path, module, level, names, repo)
            if local is not None:
                todo.extend(p.resolve() for p in local)
                continue
            top = module.split(".")[0]
            if not top or top in stdlib:
                continue
            where = f"{path.relative_to(repo)}:{line}"
            (found.optional if optional else found.required).setdefault(top, []).append(where)
    return found


def gpu_test_files(repo: Path = REPO) -> list[Path]:
    """tests/test_*.py with a `gpu` mark (what gpu.sh hands to `pytest -m gpu`), and conftest.py."""
    def marked(path: Path) -> bool:  # `pytest.mark.gpu` in the code (not in a string)
        return any(isinstance(n, ast.Attribute) and n.attr == "gpu" and isinstance(n.value, ast.Attribute)
                   and n.value.attr == "mark" for n in ast.walk(ast.parse(path.read_text(), filename=str(path))))

    files = [p for p in sorted((repo / "tests").glob("test_*.py")) if marked(p)]
    return files + [repo / "tests" / "conftest.py"]


def distributions_of(top: str, table: dict[str, list[str]]) -> list[str]:
    return sorted({norm(d) for d in table.get(top, [])})


def requirement_problems(name: str, requires: list[str], image: dict, wheels: dict) -> list[str]:
    """A wheel's unconditional requirements that are neither carried nor in the image, or whose version bound the
    image's known version breaks."""
    from packaging.requirements import Requirement

    problems = []
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(MARKERS):
            continue
        dep = norm(req.name)
        if dep in wheels:
            version, where = wheels[dep], "carried wheel"
        elif dep in image:
            version, where = image[dep], "image"
        else:
            problems.append(f"wheel {name} requires '{text}', which is neither in the image nor in bench/gpu-wheels.txt")
            continue
        if version and req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"wheel {name} requires '{text}' but the {where} has {dep} {version}")
    return problems


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a .whl file."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    head = text.split("\n\n", 1)[0]
    get = lambda key: [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith(key + ":")]  # noqa: E731
    return get("Name")[0], get("Version")[0], get("Requires-Dist")


def carried_bytes(repo: Path = REPO, carry: tuple[str, ...] = (".whl",)) -> tuple[int, int]:
    """(tree bytes, carried-path bytes): tracked and untracked-not-ignored files as they are on disk, and `carry`."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                             capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum((repo / f).stat().st_size for f in set(listing) if f and (repo / f).is_file())
    extra = sum(p.stat().st_size for c in carry if (repo / c).exists() for p in (repo / c).rglob("*") if p.is_file())
    return tree, extra


def check(repo: Path = REPO, image_file: Path | None = None, wheel_file: Path | None = None,
          wheel_dir: Path | None = None, entries: list[Path] | None = None, table: dict | None = None,
          size: tuple[int, int] | None = None, log=print) -> list[str]:
    """All the dry run's problems (empty: ready to carry). Arguments default to the real tree."""
    image = read_packages(image_file or repo / "bench" / "gpu-image-packages.txt")
    wheels = read_packages(wheel_file or repo / "bench" / "gpu-wheels.txt")
    wheel_dir = wheel_dir or repo / ".whl"
    table = table if table is not None else md.packages_distributions()
    entries = entries if entries is not None else gpu_test_files(repo) + [repo / s for s in GPU_SCRIPTS]
    problems = [f"{p.relative_to(repo)}: missing (bench/gpu.sh runs it)" for p in entries if not p.is_file()]
    found = walk([p for p in entries if p.is_file()], repo)
    log(f"walked {len(found.files)} project files from {len(entries)} entry points")
    needed: set[str] = set()
    for top, where in sorted(found.required.items()):
        dists = distributions_of(top, table)
        if not dists:
            problems.append(f"import {top} ({where[0]}): no installed distribution provides it here")
            continue
        for d in dists:
            needed.add(d)
            if d not in image and d not in wheels:
                problems.append(f"import {top} ({', '.join(where[:3])}): distribution {d} is neither in the image "
                                f"nor in bench/gpu-wheels.txt")
    for top, where in sorted(found.optional.items()):
        dists = distributions_of(top, table)
        if not any(d in image or d in wheels for d in dists):
            log(f"note: optional import {top} ({where[0]}) will not resolve there (guarded, so allowed)")
    from_wheels = sorted(needed & set(wheels))
    log(f"from the image: {', '.join(sorted(needed - set(wheels)))}")
    log(f"imports need {len(needed)} distributions: {len(needed) - len(from_wheels)} from the image, "
        f"{len(from_wheels)} from wheels ({', '.join(from_wheels) or 'none'})")
    unknown = sorted(d for d in needed if d in image and image[d] is None and d not in wheels)
    if unknown:
        log(f"note: image versions not in the package list (bounds unchecked): {', '.join(unknown)}")
    if wheel_dir.is_dir() and list(wheel_dir.glob("*.whl")):
        have: dict[str, list[str]] = {}
        for w in sorted(wheel_dir.glob("*.whl")):
            name, version, requires = wheel_metadata(w)
            have.setdefault(norm(name), []).append(version)
            problems += requirement_problems(f"{name} {version}", requires, image, wheels)
        for name, version in wheels.items():
            got = have.get(name, [])
            if got != [version] if version else len(got) != 1:
                problems.append(f".whl/: {name}=={version} expected once, found {got or 'none'}; run `make gpu-wheels`")
        problems += [f".whl/: {n} {', '.join(v)} is not in bench/gpu-wheels.txt (two versions or strays stop the install); "
                     f"run `make gpu-wheels`" for n, v in have.items() if n not in wheels]
        if not (wheel_dir / "assets.tar.gz").is_file():
            problems.append(".whl/assets.tar.gz is missing (the demo tokenizer and CHAMP); run `make gpu-wheels`")
        log(f".whl/: {sum(len(v) for v in have.values())} wheels checked against the list and their requirements")
    else:
        log("note: no .whl/ here (`make gpu-wheels`): wheel files and their requirements not checked")
    tree, extra = size if size is not None else carried_bytes(repo)
    log(f"carried: tree {tree / 2**20:.1f} MiB + .whl {extra / 2**20:.1f} MiB = {(tree + extra) / 2**20:.1f} MiB "
        f"(limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    if tree + extra > LIMIT_BYTES:
        problems.append(f"carried size {(tree + extra) / 2**20:.1f} MiB is over the device's "
                        f"{LIMIT_BYTES / 2**20:.0f} MiB")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list-tests", action="store_true", help="print the gpu-marked test files and exit")
    args = p.parse_args(argv)
    if args.list_tests:
        print(" ".join(str(f.relative_to(REPO)) for f in gpu_test_files() if f.name != "conftest.py"))
        return 0
    problems = check()
    for line in problems:
        print(f"dry run: {line}", file=sys.stderr)
    print("dry run: " + ("FAILED" if problems else "ok: the GPU path resolves from the image plus the wheels and fits"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
