"""A/A check of the regression gate: identical code measured twice must never be called SLOW.

    python scripts/aa_gate.py --bench-pairs 10 --run-pairs 10          # the acceptance figures (idle machine)
    python scripts/aa_gate.py --bench-pairs 2 --run-pairs 1 --timeout-s 0.5
    python scripts/aa_gate.py --from DIR       # judge again the pairs a run with --keep DIR measured (compare only)

Each pair runs the same `tokprof bench` (the command of issue 14, CPU, short timeouts) or `tokprof run --no-report`
twice back to back, then `tokprof compare A B`, and tallies the gating verdicts (SAME / AMBIGUOUS / SLOW / FAST, from
`compare --json` when the command has it, else from the markdown table) and the exit statuses. Goal: >= 95% SAME
(AMBIGUOUS is an honest answer on a noisy machine) and no exit 1. Everything goes to a temporary folder and a
private history database; the last line is one JSON document with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_OPS = "swiglu,rms_norm,linear,rope,decode_attention"
BENCH_SHAPES = ("T=16,I=4096,H=4096,M=16,N=4096,K=4096,Hq=32,Hkv=8,D=128",
                "B=4,context=1024,T=1,I=14336,M=1,N=1024,K=4096,H=1024")
VERDICTS = ("SAME", "AMBIGUOUS", "SLOW", "FAST")
ROW = re.compile(r"^\| \*\*(SAME|AMBIGUOUS|SLOW|FAST)\*\* \| (\w+) \|.*\| (yes|no \(info\)) \|$")


def tokprof(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from tokprof.cli import main; main()", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def verdicts_of(markdown: str) -> Counter:
    """Gating verdicts by (kind, verdict) from compare's markdown (SAME rows included, inside <details>)."""
    out: Counter = Counter()
    for line in markdown.splitlines():
        m = ROW.match(line.strip())
        if m and m.group(3) == "yes":
            out[(m.group(2), m.group(1))] += 1
    return out


def one_pair(kind: str, index: int, work: Path, env: dict[str, str], timeout_s: float,
             limit_s: float, measure: bool = True) -> dict:
    paths = []
    for side in ("a", "b") if measure else ():
        if kind == "bench":
            path = work / f"bench-{index}-{side}.json"
            args = ["bench", "--op", BENCH_OPS, "--device", "cpu", *[a for s in BENCH_SHAPES for a in ("--shape", s)],
                    "--timeout-s", str(timeout_s), "-o", str(path)]
        else:
            path = work / f"run-{index}-{side}"
            args = ["run", "--device", "cpu", "--no-report", "-o", str(path), "--db", str(work / "history.db")]
        t0 = time.perf_counter()
        done = tokprof(args, env, limit_s)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} pair {index} {side}: exit {done.returncode}: {done.stderr[-2000:]}")
        if kind == "run":
            (path,) = sorted(path.glob("run-*.json"))
        paths.append(path)
        print(f"  {kind} {index}{side}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not measure:  # the files a run with --keep left
        paths = [work / f"bench-{index}-{s}.json" for s in "ab"] if kind == "bench" else \
            [sorted((work / f"run-{index}-{s}").glob("run-*.json"))[0] for s in "ab"]
    cmp = tokprof(["compare", str(paths[0]), str(paths[1])], env, 300)
    if cmp.returncode not in (0, 1):
        raise RuntimeError(f"{kind} pair {index}: compare exit {cmp.returncode}: {cmp.stderr[-2000:]}")
    counts = verdicts_of(cmp.stdout)
    drift = re.search(r"Whole-run drift: ([+-][\d.]+%)", cmp.stdout)
    shared = "shared CPU" in cmp.stdout
    slow = [line for line in cmp.stdout.splitlines() if line.startswith("| **SLOW**")]
    return {"kind": kind, "pair": index, "exit": cmp.returncode, "counts": {f"{k} {v}": n for (k, v), n in
                                                                          sorted(counts.items())},
            "drift": drift.group(1) if drift else None, "shared_cpu": shared, "slow_rows": slow[:5]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-pairs", type=int, default=10)
    ap.add_argument("--run-pairs", type=int, default=10)
    ap.add_argument("--timeout-s", type=float, default=1.0, help="bench --timeout-s per call (the issue's: 1)")
    ap.add_argument("--limit-s", type=float, default=1800.0, help="longest one command may take")
    ap.add_argument("--keep", type=Path, default=None, help="keep the RunResults in this folder")
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="judge again the pairs kept in this folder (--keep of an earlier run): compare only")
    args = ap.parse_args()
    if args.bench_pairs < 0 or args.run_pairs < 0 or not args.timeout_s > 0:
        ap.error("pairs must be >= 0 and --timeout-s > 0")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "160"}
    with tempfile.TemporaryDirectory(prefix="tokprof-aa-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env["TOKPROF_HISTORY_DB"] = str(work / "history.db")
        if args.source is not None:
            work = args.source
            env["TOKPROF_HISTORY_DB"] = str(work / "history.db")
            counts = {k: len({p.name.rsplit("-", 1)[0] for p in work.glob(f"{k}-*-a*")}) for k in ("bench", "run")}
            pairs = [one_pair(k, i, work, env, args.timeout_s, args.limit_s, measure=False)
                     for k in ("bench", "run") for i in range(counts[k])]
        else:
            pairs = [one_pair("bench", i, work, env, args.timeout_s, args.limit_s) for i in range(args.bench_pairs)]
            pairs += [one_pair("run", i, work, env, args.timeout_s, args.limit_s) for i in range(args.run_pairs)]
    summary: dict = {"load_avg_1m": os.getloadavg()[0], "cores": os.cpu_count(), "pairs": pairs}
    for kind in ("bench", "run"):
        mine = [p for p in pairs if p["kind"] == kind]
        if not mine:
            continue
        tally: Counter = Counter()
        for p in mine:
            for key, n in p["counts"].items():
                tally[key.split(" ")[1]] += n
        total = sum(tally.values()) or 1
        summary[kind] = {"pairs": len(mine), "items": sum(tally.values()),
                         "share": {v: round(tally[v] / total, 3) for v in VERDICTS},
                         "exit_1": sum(p["exit"] == 1 for p in mine),
                         "shared_cpu_pairs": sum(p["shared_cpu"] for p in mine)}
        share = summary[kind]["share"]
        print(f"{kind}: {len(mine)} pair(s), {summary[kind]['items']} gating items: "
              + ", ".join(f"{v} {share[v]:.1%}" for v in VERDICTS)
              + f"; exit 1 in {summary[kind]['exit_1']} pair(s); shared CPU in {summary[kind]['shared_cpu_pairs']}")
    print(json.dumps(summary))
    return 1 if any(p["exit"] == 1 for p in pairs) else 0


if __name__ == "__main__":
    sys.exit(main())
