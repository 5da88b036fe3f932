"""bench/gpu.sh's summary file, rewritten after every part so that a run cut short still says what finished.

    python bench/gpu_summary.py init SUMMARY.json --budget S --parts "pytest kernel ..."
    python bench/gpu_summary.py record SUMMARY.json NAME --rc N --seconds S --limit S [--result FILE]

{"device", "torch", "budget_s", "parts_selected", "parts": {name: {"rc", "passed", "timed_out", "seconds",
"limit_s", "result" (file name or null when the part wrote none), and for a JUnit result "tests", "failures",
"errors", "skipped", "failed" (test ids)}}}. Exit codes 124/137 are `timeout`'s.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_counts(path: Path) -> dict:
    """Totals and the ids of failed or erroring tests of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["init", "record"])
    p.add_argument("summary", type=Path)
    p.add_argument("name", nargs="?")
    p.add_argument("--budget", type=int)
    p.add_argument("--parts", default="")
    p.add_argument("--rc", type=int)
    p.add_argument("--seconds", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--result", type=Path)
    args = p.parse_args(argv)
    if args.action == "init":
        import torch

        data = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "budget_s": args.budget, "parts_selected": args.parts.split(), "parts": {}}
        write(args.summary, data)
        return 0
    if not args.name:
        p.error("record needs NAME")
    data = json.loads(args.summary.read_text())
    part = {"rc": args.rc, "passed": args.rc == 0, "timed_out": args.rc in (124, 137), "seconds": args.seconds,
            "limit_s": args.limit, "result": None}
    if args.result is not None and args.result.is_file():
        part["result"] = args.result.name
        if args.result.suffix == ".xml":
            try:
                part |= junit_counts(args.result)
            except ET.ParseError as e:
                part["junit_error"] = str(e)
    data["parts"][args.name] = part
    write(args.summary, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
