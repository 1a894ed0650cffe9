"""Does the bottom-up model close on this CPU? `tokprof run`'s default CPU points, L4 predicted against measured.

    python scripts/cpu_closure_check.py                 # one default `tokprof run` (tiny, torch, fp32), ~1 minute
    python scripts/cpu_closure_check.py --repeat 3      # three runs: each judged, and the median of their errors
    python scripts/cpu_closure_check.py --from run.json # judge a RunResult already written

Prints, per point, the kernel phase's sum, the paired kernel rounds' sum (timed between the end-to-end blocks, see
docs/measurement.md), the predicted step (paired sum + measured host work, computed without the end-to-end figures),
the measured eager step and |predicted / measured - 1|; then the median and max over the points against the goal
(median <= 10%, max <= 20%) and how busy other processes kept the CPU. Exit 0: goal met on an idle CPU; 1: missed;
3: not judged (the CPU was shared, or nothing was predicted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokprof.models.e2e_paired import paired_kernel_sum_us  # noqa: E402
from tokprof.profiler.schema import load_run  # noqa: E402
from tokprof.runner import prediction_line, prediction_summary, run_main  # noqa: E402


def judge(path: Path) -> dict:
    run = load_run(path)
    summary = prediction_summary(run)
    print(f"\n{path}")
    print(f"{'batch':>5} {'ctx':>5} {'kernel sum us':>14} {'paired sum us':>14} {'predicted us':>13} "
          f"{'measured us':>12} {'error':>8}")
    for rec in run.reconciliation:
        layers = {lv["name"]: lv for lv in rec["layers"]}
        l2, l4 = layers.get("L2", {}), layers.get("L4", {})
        if l4.get("predicted_step_time_us") is None:
            print(f"{rec['batch']:>5} {rec['context']:>5}  no prediction: {l4.get('prediction_source')}")
            continue
        err = l4.get("prediction_error_pct")
        paired = next((paired_kernel_sum_us(m["paired_kernels"]) for m in run.e2e
                       if m.get("paired_kernels") and (m["batch"], m["context"]) == (rec["batch"], rec["context"])),
                      None)
        print(f"{rec['batch']:>5} {rec['context']:>5} {l2.get('step_time_us') or 0:>14.1f} "
              f"{'-' if paired is None else f'{paired:.1f}':>14} {l4['predicted_step_time_us']:>13.1f} "
              f"{l4.get('step_time_us') or 0:>12.1f} "
              f"{'-' if err is None else f'{err:+.1f}%':>8}")
    load = run.cpu_load or {}
    phases = ", ".join(f"{k} {v.get('other_cores'):.2f}" for k, v in (load.get("phases") or {}).items()
                       if isinstance(v.get("other_cores"), (int, float)))
    print(f"cpu_load: other processes {load.get('other_cores')} of {load.get('cores')} cores"
          + (f" ({phases})" if phases else "") + f"; contended: {load.get('contended')}")
    print(prediction_line(summary) or "nothing predicted")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs to make (default 1)")
    parser.add_argument("--from", dest="paths", nargs="*", default=[], help="judge these RunResult files instead")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat: expected a positive int, got {args.repeat}")
    paths = [Path(p) for p in args.paths]
    if not paths:
        out = Path(args.out or tempfile.mkdtemp(prefix="tokprof-closure-"))
        for i in range(args.repeat):
            paths.append(run_main(out_dir=out / f"run{i}", device="cpu", command=["cpu_closure_check.py"],
                                  history_db=out / "history.db", report=False))
    summaries = [judge(p) for p in paths]
    judged = [s for s in summaries if s["reliable"] and s["points"]]
    print("\n== closure ==")
    if len(summaries) > 1 and judged:
        print(f"median over {len(judged)} uncontended run(s): median error "
              f"{statistics.median(s['median_abs_error_pct'] for s in judged):.1f}%, max error "
              f"{statistics.median(s['max_abs_error_pct'] for s in judged):.1f}%")
    if not judged:
        print("not judged: every run was contended or predicted nothing (see above)")
        return 3
    met = all(s["met"] for s in judged)
    hits = sum(s["met"] for s in judged)
    print(f"goal ({judged[0]['goal']}): met in {hits} of {len(judged)} judged run(s), missed in "
          f"{len(judged) - hits}; {len(summaries) - len(judged)} run(s) not judged (contended)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
