"""Run one lab on many seeds (headless, papermill, in parallel) and print its claims and metrics per seed.

    python bench/lab_seeds.py 01 --seeds 0-9 --workers 2 [-p quick True] [--metrics student_mmd teacher100_mmd]
                              [--out runs/seeds/01-full]

Every claim a lab asserts must hold on any seed: this is how the margins in the labs are measured. Executed
notebooks and results go to runs/seeds/<lab>/seed-N.{ipynb,json} (or --out).
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dmd2lab import labs
from dmd2lab.cli import parameter_value

ROOT = Path(__file__).resolve().parent.parent


def seeds(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def lab_path(lab: str) -> Path:
    matches = [p for p in labs.find_labs(ROOT / "labs") if p.stem.startswith(lab)]
    if len(matches) != 1:
        raise SystemExit(f"lab {lab!r} matches {len(matches)} labs in {ROOT / 'labs'}; give a unique prefix")
    return matches[0]


def run_one(lab: str, seed: int, out: str, parameters: dict) -> dict:
    out = Path(out)
    return {"seed": seed, **labs.execute_lab(lab_path(lab), out / f"seed-{seed}.ipynb", out / f"seed-{seed}.json",
                                             {**parameters, "seed": seed})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", help="lab name or prefix, e.g. 01")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--metrics", nargs="*", default=None, help="metric columns (default: all)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/seeds/<lab>)")
    args = parser.parse_args(argv)
    parameters = {k: parameter_value(v) for k, v in args.parameter}
    lab_path(args.lab)
    # Absolute: the notebooks run with labs/ as their working directory.
    out = Path(args.out).resolve() if args.out else ROOT / "runs" / "seeds" / args.lab
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(run_one, [args.lab] * len(seeds(args.seeds)), seeds(args.seeds),
                             [str(out)] * len(seeds(args.seeds)), [parameters] * len(seeds(args.seeds))))
    claim_names = sorted({c for r in rows for c in r["claims"]})
    metric_names = args.metrics or sorted({m for r in rows for m in r["metrics"]})
    print(f"lab {args.lab}, parameters {parameters or 'defaults'}, {len(rows)} seeds\n")
    print("| seed | wall (s) | claims held | " + " | ".join(metric_names) + " |")
    print("|---" * (3 + len(metric_names)) + "|")
    for r in rows:
        held = sum(r["claims"].get(c, False) for c in claim_names)
        failed = [c for c in claim_names if not r["claims"].get(c, False)]
        print(f"| {r['seed']} | {r['wall_s']:.0f} | {held}/{len(claim_names)}"
              f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''} | "
              + " | ".join(f"{r['metrics'].get(m, float('nan')):.4g}" for m in metric_names) + " |")
    print("\n| metric | min | max |\n|---|---|---|")
    for m in metric_names:
        values = [r["metrics"][m] for r in rows if m in r["metrics"]]
        if values:
            print(f"| {m} | {min(values):.4g} | {max(values):.4g} |")
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"seed {r['seed']}: {r['error'] or 'claims failed'}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
