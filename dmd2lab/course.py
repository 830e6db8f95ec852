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


def grade_notebook(student: str, lab: Path, submission: Path, timeout: int, executed_dir: Path | None = None
                   ) -> list[GradeRow]:
    """Grade one submission of one lab: one row per graded cell of the source lab. Never raises."""
    import nbformat
    protected, graded = _source_cells(lab)
    rows = {c.metadata.nbgrader["grade_id"]: GradeRow(student, lab.stem, c.metadata.nbgrader["grade_id"], 0,
                                                     _points(c), "not run") for c in graded}

    def all_rows(status: str, message: str) -> list[GradeRow]:
        for row in rows.values():
            row.status, row.message = status, message
        return list(rows.values())

    try:
        nb = nbformat.read(submission, as_version=4)
        if not isinstance(nb.get("cells"), list):
            raise ValueError("no list of cells")
    except Exception as e:  # not JSON, not a notebook, unreadable: the batch goes on
        text = str(e).strip().splitlines()
        return all_rows(MALFORMED, f"unreadable notebook: {type(e).__name__}: {text[0] if text else ''}"[:300])
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
            index = by_id[grade_id]
            mine = nb.cells[index]
            if mine.cell_type != cell.cell_type or source_checksum(mine.get("source", "")) != source_checksum(
                    cell.source):
                flags[grade_id if grade_id in rows else "*"] = f"{LOCKED_EDITED}: {grade_id!r} restored from the source"
            restored = copy.deepcopy(cell)  # source, type and metadata (points) all from the instructor's lab
            if restored.cell_type == "code":
                restored.outputs, restored.execution_count = [], None
            nb.cells[index] = restored
        present = [by_id[g] for g in rows if g in by_id and rows[g].status != CHECK_DELETED]
        if present:
            for cell in nb.cells:  # a student's stale outputs never count
                if cell.cell_type == "code":
                    cell.outputs, cell.execution_count = [], None
            with tempfile.TemporaryDirectory(prefix="dmd2lab-grade-") as workdir:
                parameters = {**smoke_parameters(lab), "results_path": str(Path(workdir) / "results.json")}
                runs = run_notebook(nb, parameters, timeout, workdir, upto=max(present))
                if executed_dir is not None:
                    executed_dir.mkdir(parents=True, exist_ok=True)
                    nbformat.write(nb, executed_dir / lab.name)
            for grade_id, row in rows.items():
                if row.status == CHECK_DELETED:
                    continue
                run = runs[by_id[grade_id]]
                row.status = {"ok": "passed", "error": "failed"}.get(run.status, run.status)
                row.points = row.max_points if run.status == "ok" else 0
                row.message = run.message
        for grade_id, row in rows.items():
            notes = [flags[k] for k in (grade_id, "*") if k in flags]
            if notes:
                row.status = f"{row.status}, {LOCKED_EDITED}" if any(LOCKED_EDITED in n for n in notes) else row.status
                row.message = "; ".join(notes + ([row.message] if row.message else []))
        return list(rows.values())
    except Exception as e:  # anything else (a kernel that would not start, ...): this notebook scores 0
        return all_rows("error", f"grading failed: {type(e).__name__}: {e}"[:300])


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
    names = {lab.name for lab in labs}
    rows: list[GradeRow] = []
    ignored: list[str] = []
    for student in students:
        ignored += [f"{student.name}/{p.name}" for p in sorted(student.glob("*.ipynb")) if p.name not in names]
        for lab in labs:
            submission = student / lab.name
            started = time.perf_counter()
            if not submission.is_file():
                _, graded = _source_cells(lab)
                lab_rows = [GradeRow(student.name, lab.stem, c.metadata.nbgrader["grade_id"], 0, _points(c),
                                     NOT_SUBMITTED, f"no {lab.name} in {student.name}/") for c in graded]
            else:
                lab_rows = grade_notebook(student.name, lab, submission, timeout, out / "executed" / student.name)
            rows += lab_rows
            if log:
                log(f"{student.name} {lab.stem}: {sum(r.points for r in lab_rows)}/"
                    f"{sum(r.max_points for r in lab_rows)} ({', '.join(r.status for r in lab_rows)}; "
                    f"{time.perf_counter() - started:.1f} s)")
    result = [asdict(r) for r in rows]
    with open(out / "grades.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(result)
    (out / "report.md").write_text(report(result, ignored))
    return result


def report(rows: list[dict], ignored: list[str] = ()) -> str:
    """A readable report: a total per student, then per student and lab the points, status and messages."""
    students = list(dict.fromkeys(r["student"] for r in rows))
    lines = ["# Grades", "", "| student | points | max | flagged |", "|---|---|---|---|"]
    for s in students:
        mine = [r for r in rows if r["student"] == s]
        flagged = [f"{r['lab']}: {r['status']}" for r in mine
                   if r["status"] in (CHECK_DELETED, MALFORMED, "error") or LOCKED_EDITED in r["status"]]
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
