"""`rpt-train experiment`: run a spec's arms (rpt_train.experiment) and write its report (rpt_train.report), which
reads the records, the spec's eval design and the arms' locks through rpt_train.experiment: this module sits on both,
so neither imports the other back."""
from __future__ import annotations

from pathlib import Path

from rpt_train.experiment import Experiment, load_spec, single_process, stages
from rpt_train.report import check_design, kept_records, write_report


def run_experiment(spec_path: str, arms: list[str] | None = None, *, report_only: bool = False,
                   rerun: bool = False) -> Path:
    """Run the asked arms (all by default) that are not finished, then write the report; returns its JSON path."""
    single_process()
    spec = load_spec(spec_path)
    exp = Experiment(spec)
    levers, arms = stages(spec, arms)
    if not report_only:
        todo = exp.order(arms) if arms != [] else []
        # before any arm runs: a kept record evaluated otherwise than the spec now says is refused now, not after
        # hours of training (run_arm, write_report would refuse it then)
        for name in [] if rerun else todo:
            if exp.record_path(name).exists():
                exp.check_record(name)
        check_design(spec, {a: r for a, r in kept_records(spec)[0].items() if not (rerun and a in todo)})
        if levers:
            exp.measure_levers(rerun=rerun and arms == [])
        for name in todo:
            exp.run_arm(name, rerun=rerun)
    return write_report(spec)
