"""The ``dmd2lab`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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

    course = commands.add_parser("course", help="student copies of the labs and autograding of submissions",
                                 description="The course kit (docs/teaching.md): make the student copies of the labs, "
                                             "then grade what the students hand back.")
    course_commands = course.add_subparsers(dest="course_command", required=True)
    student = course_commands.add_parser(
        "student", help="write the student copy of every lab (solutions stubbed, outputs cleared)",
        description="Write the student copy of every lab to OUTDIR with nbgrader's own preprocessors: solution "
                    "regions replaced by `raise NotImplementedError()`, hidden tests removed, outputs and execution "
                    "counts cleared; the graded check cells are kept, locked.")
    student.add_argument("outdir", metavar="OUTDIR", help="folder for the student copies (created if missing)")
    student.add_argument("--labs", default="labs", help="folder of NN_name.ipynb labs with solutions (default: labs)")
    grading = course_commands.add_parser(
        "grade", help="grade SUBMISSIONS/<student>/<NN_name>.ipynb; write grades.csv and report.md",
        description="Grade every SUBMISSIONS_DIR/<student>/<NN_name>.ipynb against its source lab: graded cells must "
                    "be present and unchanged (edited ones are flagged and put back), then each notebook runs headless "
                    "with the lab's smoke parameters up to its last graded cell; a graded cell scores its points iff "
                    "it runs without error. A missing lab scores 0 (not submitted); an unreadable, hanging or crashing "
                    "notebook scores 0 for what it did not reach, and the batch goes on.")
    grading.add_argument("submissions", metavar="SUBMISSIONS_DIR", help="one folder per student, holding NN_name.ipynb")
    grading.add_argument("--labs", default="labs", help="folder of the source labs, with solutions (default: labs)")
    grading.add_argument("--out", default="grades",
                         help="where grades.csv, report.md and the executed notebooks go (default: grades)")
    grading.add_argument("--timeout", type=int, default=120,
                         help="seconds allowed per notebook (each runs in a process of its own); past it, that notebook scores what it had not reached as 0 (default: 120)")
    return parser


def course_main(args) -> int:
    from . import course
    if args.course_command == "student":
        out = Path(args.outdir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"OUTDIR {out.resolve()} exists and is not a folder; pass a folder for the student copies")
        for path in course.make_student_copies(args.labs, out):
            print(path)
        return 0
    if args.timeout < 1:
        raise ValueError(f"--timeout must be at least 1 second; got {args.timeout}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {Path(args.out).resolve()} exists and is not a folder; pass a folder for the grades")
    rows = course.grade(args.submissions, args.labs, args.out, args.timeout)
    out = Path(args.out)
    print(f"{len({r['student'] for r in rows})} students graded; wrote {out / 'grades.csv'} and {out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import labs
    try:
        if args.command == "course":
            return course_main(args)
        if args.labs_command == "list":
            for path in labs.find_labs(args.labs):
                params = ", ".join(f"{k}={v!r}" for k, v in labs.declared_parameters(path).items())
                print(f"{path.stem}: {params}")
            return 0
        failed = labs.run_labs(args.labs, args.out, args.only, dict(_parameter(p) for p in args.parameter),
                               args.timeout, args.smoke)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dmd2lab: error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
