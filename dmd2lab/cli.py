"""The ``dmd2lab`` command line."""
from __future__ import annotations

import argparse
import sys

def parameter_value(raw: str):
    """A -p value read the way papermill's own -p reads it: True/False/None, then int, then float, else str."""
    if raw in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[raw]
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _parameter(pair: list[str]) -> tuple[str, object]:
    name, raw = pair
    return name, parameter_value(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmd2lab", description="DMD2 teaching lab: run the labs headless.")
    commands = parser.add_subparsers(dest="command", required=True)
    labs = commands.add_parser("labs", help="list or run the lab notebooks")
    labs_commands = labs.add_subparsers(dest="labs_command", required=True)
    run = labs_commands.add_parser("run", help="execute the labs with papermill; write runs/ and a claims table")
    run.add_argument("--labs", default="labs", help="folder of NN_name.ipynb labs (default: labs)")
    run.add_argument("--out", default="runs", help="where executed notebooks and results go (default: runs)")
    run.add_argument("--only", nargs="+", metavar="LAB", help="run only labs whose name starts with these")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="papermill parameter for every lab that declares it, e.g. -p quick False")
    run.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default: 1800)")
    run.add_argument("--smoke", action="store_true",
                     help="tiny settings, claims reported but not checked: does every cell run? (seconds per lab)")
    listing = labs_commands.add_parser("list", help="list the labs and their parameters")
    listing.add_argument("--labs", default="labs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import labs
    try:
        if args.labs_command == "list":
            for path in labs.find_labs(args.labs):
                params = ", ".join(f"{k}={v!r}" for k, v in labs.declared_parameters(path).items())
                print(f"{path.stem}: {params}")
            return 0
        failed = labs.run_labs(args.labs, args.out, args.only, dict(_parameter(p) for p in args.parameter),
                               args.timeout, args.smoke)
    except (ValueError, FileNotFoundError) as e:
        print(f"dmd2lab: error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
