"""The course kit: student copies of the labs and autograding of the students' submissions.

Student copies are made by nbgrader's own preprocessors (the ones ``nbgrader generate_assignment`` runs), applied
standalone to each lab: solution regions become nbgrader's stub (``raise NotImplementedError()``), hidden tests and
marking schemes are removed, outputs and execution counts cleared, graded and locked cells made read-only and given
nbgrader's checksums.

Grading needs no nbgrader course directory or gradebook. Submissions are laid out as
``SUBMISSIONS/<student>/<NN_name>.ipynb``; each is checked against its source lab (every graded or locked cell
present by ``grade_id``, its source unchanged; an edited one is flagged and put back from the source, as nbgrader's
``OverwriteCells`` does), then executed headless with the lab's smoke parameters up to its last graded cell, errors
allowed; a graded cell scores its points iff it ran without error. One bad submission (unreadable, hanging, killing
its kernel) costs only its own points: the batch always finishes and writes ``grades.csv`` and ``report.md``.
``dmd2lab course student|grade`` is the command line.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .labs import HEADLESS_ENV, find_labs, smoke_parameters

FIELDS = ("student", "lab", "grade_id", "points", "max_points", "status", "message")
LOCKED_EDITED = "locked cell edited"
CHECK_DELETED = "check deleted"
NOT_SUBMITTED = "not submitted"
MALFORMED = "malformed"


# ---------------------------------------------------------------------------------------------- student copies
def student_notebook(nb):
    """The student version of one lab notebook (a copy; ``nb`` is left as it is), made the way
    ``nbgrader generate_assignment`` makes it: LockCells, ClearSolutions, ClearOutput, ClearHiddenTests,
    ClearMarkScheme, ComputeChecksums, CheckCellMetadata."""
    from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                        ClearSolutions, ComputeChecksums, LockCells)
    nb = copy.deepcopy(nb)
    resources: dict = {}  # ClearSolutions records the kernel's language here; the others need nothing
    for preprocessor in (LockCells(), ClearSolutions(), ClearOutput(), ClearHiddenTests(), ClearMarkScheme(),
                         ComputeChecksums(), CheckCellMetadata()):
        nb, resources = preprocessor.preprocess(nb, resources)
    return nb


def make_student_copies(lab_dir: str | Path = "labs", out_dir: str | Path = "student") -> list[Path]:
    """Write the student copy of every lab in ``lab_dir`` to ``out_dir/<same name>``; return the written paths."""
    import nbformat
    labs = find_labs(lab_dir)
    out = Path(out_dir)
    if out.resolve() == Path(lab_dir).resolve():
        raise ValueError(f"the student copies would overwrite the labs in {out.resolve()}; choose another OUTDIR")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for lab in labs:
        path = out / lab.name
        nbformat.write(student_notebook(nbformat.read(lab, as_version=4)), path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- notebook checks
def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def is_graded(cell) -> bool:
    return bool(_nbgrader(cell).get("grade"))


def is_protected(cell) -> bool:
    """A cell the student must not change: graded (and not also a solution) or locked."""
    meta = _nbgrader(cell)
    return bool(meta.get("grade_id")) and not meta.get("solution") and bool(meta.get("grade") or meta.get("locked"))


def source_checksum(source: str) -> str:
    """sha256 of a cell source, whitespace-normalised: line endings, trailing spaces and blank lines at either end
    do not count; indentation does (it is Python syntax)."""
    lines = [line.rstrip() for line in source.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return hashlib.sha256("\n".join(lines).strip("\n").encode()).hexdigest()


def _error_line(output) -> str:
    value = str(output.get("evalue", "")).strip()
    return f"{output.get('ename', 'Error')}: {value.splitlines()[-1]}" if value else str(output.get("ename", "Error"))


@dataclass
class CellRun:
    index: int
    status: str          # "ok" | "error" | "timeout" | "kernel died" | "not run"
    message: str = ""


def run_notebook(nb, parameters: dict, timeout: int, workdir: str | Path, upto: int | None = None) -> list[CellRun]:
    """Execute ``nb`` in place, headless, in ``workdir`` (the kernel's cwd), with ``parameters`` injected after
    its parameters cell the way papermill injects them; errors allowed. Only cells ``0..upto`` (indices before
    injection; all when None) are kept and run. Returns one CellRun per kept cell of the original notebook (the
    injected cell left out): "error" with the error's last line, "timeout" or "kernel died" for the cell that
    hung or killed the kernel, "not run" for the cells after it."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.parameterize import parameterize_notebook
    if upto is not None:
        nb.cells = nb.cells[:upto + 1]
    kept = len(nb.cells)
    for index, cell in enumerate(nb.cells):
        cell.metadata["course_index"] = index
        cell.metadata.setdefault("tags", [])  # what papermill's loader adds, and its parameterize expects
    nb.metadata.setdefault("papermill", {"default_parameters": {}, "parameters": {}, "environment_variables": {}})
    nb = parameterize_notebook(nb, parameters, kernel_name="python3", language="python")
    runs: dict[int, CellRun] = {}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True, shutdown_kernel="immediate",
                            resources={"metadata": {"path": str(workdir)}})
    env = {**os.environ, HEADLESS_ENV: "1"}
    failure = None
    try:
        with client.setup_kernel(env=env):
            for position, cell in enumerate(nb.cells):
                index = cell.metadata.get("course_index")
                if cell.cell_type != "code":
                    if index is not None:
                        runs[index] = CellRun(index, "ok")
                    continue
                try:
                    client.execute_cell(cell, position)
                except CellTimeoutError:
                    failure = ("timeout", f"a cell ran longer than the {timeout} s timeout")
                except DeadKernelError:
                    failure = ("kernel died", "the kernel died while running a cell")
                if failure:
                    if index is not None:
                        runs[index] = CellRun(index, *failure)
                    break
                errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
                if index is not None:
                    runs[index] = CellRun(index, "error", _error_line(errors[-1])) if errors else CellRun(index, "ok")
    except (CellTimeoutError, DeadKernelError) as e:  # raised while shutting down a hung or dead kernel
        failure = failure or ("kernel died", f"{type(e).__name__}: {e}")
    for cell in nb.cells:
        cell.metadata.pop("course_index", None)
    reason = f"not reached: {failure[1]}" if failure else ""
    return [runs.get(i, CellRun(i, failure[0] if failure else "not run", reason)) for i in range(kept)]


# ---------------------------------------------------------------------------------------------- grading
@dataclass
class GradeRow:
    student: str
    lab: str
    grade_id: str
    points: float
    max_points: float
    status: str
    message: str = ""


def _source_cells(lab: Path) -> tuple[list, list]:
    """The lab's protected cells and, among them, its graded ones (the exercises)."""
    import nbformat
    nb = nbformat.read(lab, as_version=4)
    protected = [c for c in nb.cells if is_protected(c)]
    return protected, [c for c in protected if is_graded(c)]


def _points(cell) -> float:
    points = float(_nbgrader(cell).get("points", 0))
    return int(points) if points.is_integer() else points


def submission_to_run(source, submission):
    """The notebook that is graded: the source lab with its solutions stubbed (the student copy), each solution cell
    (by ``grade_id``) replaced by the submission's; a solution cell missing from the submission keeps the stub."""
    run = student_notebook(source)
    answers = {_nbgrader(c).get("grade_id"): c.get("source", "") for c in submission.cells
               if _nbgrader(c).get("solution") and _nbgrader(c).get("grade_id")}
    for cell in run.cells:
        grade_id = _nbgrader(cell).get("grade_id")
        if _nbgrader(cell).get("solution") and grade_id in answers:
            cell.source = answers[grade_id]
    return run


def grade_notebook(student: str, lab: Path, submission: Path, timeout: int, executed_dir: Path | None = None
                   ) -> list[GradeRow]:
    """Grade one submission of one lab: one row per graded cell of the source lab. Never raises."""
    import nbformat
    protected, _ = _source_cells(lab)
    rows = {row.grade_id: row for row in _all_rows(student, lab, "not run", "")}
    try:
        nb = nbformat.read(submission, as_version=4)
        if not isinstance(nb.get("cells"), list):
            raise ValueError("no list of cells")
    except Exception as e:  # not JSON, not a notebook, unreadable: the batch goes on
        text = str(e).strip().splitlines()
        return _all_rows(student, lab, MALFORMED, f"unreadable notebook: {type(e).__name__}: {text[0] if text else ''}"[:300])
    try:
        # Integrity against the source: every protected cell present, unchanged; the source's copy is what runs.
        flags: dict[str, str] = {}
        by_id = {}
        for index, cell in enumerate(nb.cells):
            grade_id = _nbgrader(cell).get("grade_id")
            if grade_id and grade_id not in by_id:
                by_id[grade_id] = index
        for cell in protected:
            grade_id = cell.metadata.nbgrader["grade_id"]
            if grade_id not in by_id:
                if grade_id in rows:
                    rows[grade_id].status = CHECK_DELETED
                    rows[grade_id].message = f"the graded cell {grade_id!r} is missing from the submission"
                else:
                    flags.setdefault("*", f"locked cell {grade_id!r} deleted")
                continue
            mine = nb.cells[by_id[grade_id]]
            if mine.cell_type != cell.cell_type or source_checksum(mine.get("source", "")) != source_checksum(
                    cell.source):
                flags[grade_id if grade_id in rows else "*"] = f"{LOCKED_EDITED}: {grade_id!r} restored from the source"
        if any(row.status != CHECK_DELETED for row in rows.values()):
            # What runs is the instructor's lab with only the students' solution cells taken from the submission:
            # edits or cells added anywhere else (an import swapped, a global the check reads changed) never run.
            run = submission_to_run(nbformat.read(lab, as_version=4), nb)
            checks = {_nbgrader(c).get("grade_id"): i for i, c in enumerate(run.cells) if is_graded(c)}
            with tempfile.TemporaryDirectory(prefix="dmd2lab-grade-") as workdir:
                parameters = {**smoke_parameters(lab), "results_path": str(Path(workdir) / "results.json")}
                runs = run_notebook(run, parameters, timeout, workdir, upto=max(checks.values()))
                if executed_dir is not None:
                    executed_dir.mkdir(parents=True, exist_ok=True)
                    nbformat.write(run, executed_dir / lab.name)
            for grade_id, row in rows.items():
                if row.status == CHECK_DELETED:
                    continue
                result = runs[checks[grade_id]]
                row.status = {"ok": "passed", "error": "failed"}.get(result.status, result.status)
                row.points = row.max_points if result.status == "ok" else 0
                row.message = result.message
        for grade_id, row in rows.items():
            notes = [flags[k] for k in (grade_id, "*") if k in flags]
            if notes:
                row.status = f"{row.status}, {LOCKED_EDITED}" if any(LOCKED_EDITED in n for n in notes) else row.status
                row.message = "; ".join(notes + ([row.message] if row.message else []))
        return list(rows.values())
    except Exception as e:  # anything else (a kernel that would not start, ...): this notebook scores 0
        return _all_rows(student, lab, "error", f"grading failed: {type(e).__name__}: {e}"[:300])


def grade_isolated(student: str, lab: Path, submission: Path, timeout: int,
                   executed_dir: Path | None = None) -> list[GradeRow]:
    """:func:`grade_notebook` in a process of its own (its own session) with a wall-clock limit of ``timeout``
    seconds for the whole notebook, plus a minute for the kernel to start and stop: a submission that hangs, kills
    its parent process or exhausts memory loses only its own points. Never raises."""
    import json
    import signal
    import subprocess
    import sys
    command = [sys.executable, "-m", "dmd2lab.course", student, str(lab), str(submission), str(timeout),
               str(executed_dir or "")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return _all_rows(student, lab, "timeout", f"the notebook ran longer than the {timeout} s timeout")
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        last = (err.strip().splitlines() or [f"exit code {process.returncode}"])[-1]
        return _all_rows(student, lab, "error", f"the grading process died: {last}"[:300])
    return [GradeRow(**row) for row in json.loads(lines[-1])]


def _all_rows(student: str, lab: Path, status: str, message: str) -> list[GradeRow]:
    _, graded = _source_cells(lab)
    return [GradeRow(student, lab.stem, c.metadata.nbgrader["grade_id"], 0, _points(c), status, message)
            for c in graded]


def grade(submissions_dir: str | Path, lab_dir: str | Path = "labs", out_dir: str | Path = "grades",
          timeout: int = 120, log=print) -> list[dict]:
    """Grade every ``submissions_dir/<student>/<NN_name>.ipynb`` against the labs in ``lab_dir``; write
    ``out_dir/grades.csv``, ``out_dir/report.md`` and the executed notebooks under ``out_dir/executed/<student>/``;
    return the rows (dicts with :data:`FIELDS`). A lab a student did not hand in scores 0 ("not submitted")."""
    submissions = Path(submissions_dir)
    if not submissions.is_dir():
        raise FileNotFoundError(f"submissions folder {submissions.resolve()} does not exist; it must hold one folder "
                                "per student, each with that student's NN_name.ipynb files")
    labs = find_labs(lab_dir)
    for lab in labs:
        smoke_parameters(lab)  # every lab needs smoke settings before anything is run
    students = sorted(p for p in submissions.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not students:
        raise FileNotFoundError(f"no student folders in {submissions.resolve()}; lay submissions out as "
                                "SUBMISSIONS/<student>/<NN_name>.ipynb")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handed_in = [lab for lab in labs if any((student / lab.name).is_file() for student in students)]
    for lab in handed_in:  # a canary: if the committed lab does not score full marks here, every student would get 0
        canary = grade_isolated("(source)", lab, lab, timeout)
        if any(r.points < r.max_points for r in canary):
            raise RuntimeError(f"the source lab {lab} does not grade full marks in this environment "
                               f"({'; '.join(f'{r.status}: {r.message}' for r in canary)}); check that the kernel "
                               "can import dmd2lab and run the lab (dmd2lab labs run --smoke)")
    names = {lab.name for lab in labs}
    rows: list[GradeRow] = []
    ignored: list[str] = []
    csv_file = open(out / "grades.csv", "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=FIELDS)
    writer.writeheader()
    for student in students:
        ignored += [f"{student.name}/{p.name}" for p in sorted(student.glob("*.ipynb")) if p.name not in names]
        for lab in labs:
            submission = student / lab.name
            started = time.perf_counter()
            if not submission.is_file():
                lab_rows = _all_rows(student.name, lab, NOT_SUBMITTED, f"no {lab.name} in {student.name}/")
            else:
                lab_rows = grade_isolated(student.name, lab, submission, timeout, out / "executed" / student.name)
            rows += lab_rows
            writer.writerows(asdict(r) for r in lab_rows)  # written as graded: an interrupted batch keeps its rows
            csv_file.flush()
            if log:
                log(f"{student.name} {lab.stem}: {sum(r.points for r in lab_rows)}/"
                    f"{sum(r.max_points for r in lab_rows)} ({', '.join(r.status for r in lab_rows)}; "
                    f"{time.perf_counter() - started:.1f} s)")
    csv_file.close()
    result = [asdict(r) for r in rows]
    (out / "report.md").write_text(report(result, ignored))
    return result


def report(rows: list[dict], ignored: list[str] = ()) -> str:
    """A readable report: a total per student, then per student and lab the points, status and messages."""
    students = list(dict.fromkeys(r["student"] for r in rows))
    lines = ["# Grades", "", "| student | points | max | flagged |", "|---|---|---|---|"]
    for s in students:
        mine = [r for r in rows if r["student"] == s]
        flagged = [f"{r['lab']}: {r['status']}" for r in mine
                   if r["status"] in (CHECK_DELETED, MALFORMED, "error", "timeout", "kernel died") or LOCKED_EDITED in r["status"]]
        lines.append(f"| {s} | {sum(r['points'] for r in mine)} | {sum(r['max_points'] for r in mine)} | "
                     f"{'; '.join(flagged) or '—'} |")
    for s in students:
        lines += ["", f"## {s}", "", "| lab | exercise | points | status | message |", "|---|---|---|---|---|"]
        for r in (r for r in rows if r["student"] == s):
            message = str(r["message"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['lab']} | {r['grade_id']} | {r['points']}/{r['max_points']} | {r['status']} | "
                         f"{message} |")
    if ignored:
        lines += ["", "## Ignored files (not named like any lab)", ""] + [f"- {p}" for p in ignored]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one notebook graded in its own process: see grade_isolated
    import json
    import sys
    _student, _lab, _submission, _timeout, _executed = sys.argv[1:6]
    _rows = grade_notebook(_student, Path(_lab), Path(_submission), int(_timeout),
                           Path(_executed) if _executed else None)
    print(json.dumps([asdict(r) for r in _rows]))
