"""The course kit: student copies (nbgrader's preprocessors), grading of submissions, tampering, the CLI.

Every notebook runs with its lab's smoke parameters; the expensive pieces (student copies, one grading batch of
stubs and solutions, one batch of tampered submissions) are made once per module."""
import csv
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from dmd2lab import course, labs

ROOT = Path(__file__).resolve().parent.parent
LAB_DIR = ROOT / "labs"
LABS = labs.find_labs(LAB_DIR)
TAMPER_LAB = next(p for p in LABS if p.stem.startswith("03"))  # the cheapest prefix before its check cell


def read(path):
    return nbformat.read(path, as_version=4)


def graded_cells(nb):
    return [c for c in nb.cells if course.is_graded(c)]


def solution_lines(nb):
    """Lines inside the lab's solution regions that occur nowhere else in the lab (those would be fair to keep)."""
    inside, outside = set(), set()
    for cell in nb.cells:
        in_solution = False
        for line in cell.source.split("\n"):
            if "### BEGIN SOLUTION" in line:
                in_solution = True
            elif "### END SOLUTION" in line:
                in_solution = False
            elif line.strip():
                (inside if in_solution else outside).add(line.strip())
    return inside - outside


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    written = course.make_student_copies(LAB_DIR, out)
    assert [p.name for p in written] == [p.name for p in LABS]
    return out


@pytest.fixture(scope="module")
def graded(student_dir, tmp_path_factory):
    """One batch: student 'stub' hands in every untouched student copy, 'solution' every lab as committed."""
    subs = tmp_path_factory.mktemp("submissions")
    shutil.copytree(student_dir, subs / "stub")
    (subs / "solution").mkdir()
    for lab in LABS:
        shutil.copy(lab, subs / "solution" / lab.name)
    out = tmp_path_factory.mktemp("grades")
    rows = course.grade(subs, LAB_DIR, out, timeout=120, log=None)
    return {(r["student"], r["lab"]): r for r in rows}, out


def test_source_checksum_ignores_only_insignificant_whitespace():
    a = "def f():\n    return 1\n"
    assert course.source_checksum(a) == course.source_checksum("\n" + a.replace("\n", "  \r\n") + "\n\n")
    assert course.source_checksum(a) != course.source_checksum("def f():\n  return 1\n")
    assert course.source_checksum(a) != course.source_checksum("def f():\n    return 2\n")


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_student_copy_has_stubs_no_solutions_no_outputs_and_the_same_checks(lab, student_dir):
    source, student = read(lab), read(student_dir / lab.name)
    secret = solution_lines(source)
    assert secret, "the lab has solution lines to hide"
    text = "\n".join(c.source for c in student.cells)
    leaked = [line for line in secret if any(line == s.strip() for s in text.split("\n"))]
    assert not leaked, f"solution lines left in the student copy: {leaked}"
    assert "### BEGIN SOLUTION" not in text and "### END SOLUTION" not in text
    regions = sum(c.source.count("### BEGIN SOLUTION") for c in source.cells)
    assert text.count("raise NotImplementedError()") == regions
    for cell in student.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert len(student.cells) == len(source.cells)
    src_checks, stu_checks = graded_cells(source), graded_cells(student)
    assert src_checks and len(stu_checks) == len(src_checks)
    for a, b in zip(src_checks, stu_checks):
        assert b.source == a.source
        for key in ("grade_id", "points", "grade", "locked", "solution"):
            assert b.metadata.nbgrader[key] == a.metadata.nbgrader[key]
        assert b.metadata["editable"] is False and b.metadata["deletable"] is False


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_student_copy_runs_to_the_end_and_only_its_check_fails(lab, student_dir, tmp_path):
    nb = read(student_dir / lab.name)
    checks = [i for i, c in enumerate(nb.cells) if course.is_graded(c)]
    parameters = {**labs.smoke_parameters(lab), "results_path": str(tmp_path / "results.json")}
    runs = course.run_notebook(nb, parameters, timeout=300, workdir=tmp_path)
    failed = {r.index: r.message for r in runs if r.status != "ok"}
    assert set(failed) == set(checks), f"cells that did not run cleanly: {failed}"
    assert all(m.startswith("NotImplementedError") for m in failed.values()), failed
    assert runs[-1].status == "ok" and (tmp_path / "results.json").exists(), "the lab's last cell must still run"


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_untouched_student_copy_scores_zero(lab, graded):
    rows, _ = graded
    row = rows[("stub", lab.stem)]
    assert row["points"] == 0 and row["max_points"] > 0
    assert row["status"] == "failed" and row["message"].startswith("NotImplementedError"), row


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_solution_scores_full_marks(lab, graded):
    rows, _ = graded
    row = rows[("solution", lab.stem)]
    assert row["status"] == "passed" and row["points"] == row["max_points"] == 2, row


def test_grades_csv_and_report(graded):
    rows, out = graded
    with open(out / "grades.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(course.FIELDS)
    assert len(table) == 2 * len(LABS)
    report = (out / "report.md").read_text()
    total = sum(r["max_points"] for r in rows.values()) // 2
    assert f"| solution | {total} | {total} |" in report and f"| stub | 0 | {total} |" in report
    assert (out / "executed" / "solution" / LABS[0].name).exists()


@pytest.fixture(scope="module")
def tampered(student_dir, tmp_path_factory):
    """One batch on one lab: an edited check, a deleted check, a malformed file, a hanging cell, and an honest
    solution next to them; every student is missing the other labs."""
    subs = tmp_path_factory.mktemp("tampered")
    name = TAMPER_LAB.name
    solution, stub = read(TAMPER_LAB), read(student_dir / name)

    def hand_in(student, nb):
        (subs / student).mkdir()
        nbformat.write(nb, subs / student / name)

    check = next(i for i, c in enumerate(stub.cells) if course.is_graded(c))
    stub.cells[check].source = "print('ok')"
    hand_in("edited", stub)
    deleted = read(TAMPER_LAB)
    del deleted.cells[check]
    hand_in("deleted", deleted)
    (subs / "malformed").mkdir()
    (subs / "malformed" / name).write_text("{ this is not a notebook")
    hanging = read(TAMPER_LAB)
    hanging.cells[check - 1].source = "import time; time.sleep(1000)\n" + hanging.cells[check - 1].source
    hand_in("hanging", hanging)
    elsewhere = read(TAMPER_LAB)  # an edit outside the solution cell never runs: the source's cells do
    setup = next(i for i, c in enumerate(elsewhere.cells) if "labs.start(globals())" in c.source)
    elsewhere.cells[setup].source = "raise RuntimeError('tampered setup')"
    elsewhere.cells.insert(check, nbformat.v4.new_code_cell("raise RuntimeError('an inserted cell')"))
    hand_in("elsewhere", elsewhere)
    killer = read(TAMPER_LAB)
    killer.cells[check - 1].source = "import os; os.kill(os.getppid(), 9)\n" + killer.cells[check - 1].source
    hand_in("killer", killer)
    hand_in("honest", solution)
    out = tmp_path_factory.mktemp("tampered-grades")
    started = time.perf_counter()
    rows = course.grade(subs, LAB_DIR, out, timeout=20, log=None)
    return {(r["student"], r["lab"]): r for r in rows}, out, time.perf_counter() - started


def test_edited_check_is_flagged_restored_and_scores_zero(tampered):
    row = tampered[0][("edited", TAMPER_LAB.stem)]
    assert course.LOCKED_EDITED in row["status"] and row["points"] == 0
    assert "NotImplementedError" in row["message"], "the source's check ran, against the stub"


def test_deleted_check_scores_zero(tampered):
    row = tampered[0][("deleted", TAMPER_LAB.stem)]
    assert row["status"] == course.CHECK_DELETED and row["points"] == 0


def test_malformed_notebook_scores_zero_with_a_reason(tampered):
    row = tampered[0][("malformed", TAMPER_LAB.stem)]
    assert row["status"] == course.MALFORMED and row["points"] == 0 and "unreadable" in row["message"]


def test_hanging_notebook_times_out_and_the_batch_goes_on(tampered):
    rows, _, wall = tampered
    row = rows[("hanging", TAMPER_LAB.stem)]
    assert row["status"] == "timeout" and row["points"] == 0 and "20 s" in row["message"]
    assert rows[("honest", TAMPER_LAB.stem)]["points"] == 2, "the student graded after it is graded normally"
    assert wall < 120


def test_only_the_solution_cells_of_a_submission_run(tampered):
    row = tampered[0][("elsewhere", TAMPER_LAB.stem)]
    assert row["points"] == 2 and row["status"] == "passed", row


def test_a_kernel_that_kills_its_grader_costs_only_its_own_points(tampered):
    rows = tampered[0]
    row = rows[("killer", TAMPER_LAB.stem)]
    assert row["points"] == 0 and row["status"] == "error" and "died" in row["message"], row
    assert rows[("honest", TAMPER_LAB.stem)]["points"] == 2


def test_the_grader_refuses_an_environment_where_the_source_lab_fails(tmp_path):
    broken_labs = tmp_path / "labs"
    broken_labs.mkdir()
    broken = read(TAMPER_LAB)
    check = next(c for c in broken.cells if course.is_graded(c))
    check.source = "assert False, 'this environment cannot pass the check'"
    nbformat.write(broken, broken_labs / TAMPER_LAB.name)
    (tmp_path / "subs" / "ada").mkdir(parents=True)
    shutil.copy(TAMPER_LAB, tmp_path / "subs" / "ada" / TAMPER_LAB.name)
    with pytest.raises(RuntimeError, match="does not grade full marks"):
        course.grade(tmp_path / "subs", broken_labs, tmp_path / "grades", timeout=60, log=None)


def test_missing_lab_is_not_submitted(tampered):
    rows, out, _ = tampered
    other = next(p for p in LABS if p != TAMPER_LAB)
    row = rows[("honest", other.stem)]
    assert row["status"] == course.NOT_SUBMITTED and row["points"] == 0
    report = (out / "report.md").read_text()
    assert "| edited |" in report and course.LOCKED_EDITED in report and course.CHECK_DELETED in report


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dmd2lab.cli", "course", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tmp_path):
    done = cli("student", tmp_path / "student", "--labs", LAB_DIR)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == [p.name for p in LABS]
    (tmp_path / "subs" / "ada").mkdir(parents=True)
    shutil.copy(tmp_path / "student" / LABS[-1].name, tmp_path / "subs" / "ada")
    done = cli("grade", tmp_path / "subs", "--labs", LAB_DIR, "--out", tmp_path / "grades", "--timeout", 60)
    assert done.returncode == 0, done.stderr
    table = list(csv.DictReader(open(tmp_path / "grades" / "grades.csv")))
    assert {(r["lab"], r["status"]) for r in table} == {(p.stem, "failed" if p == LABS[-1] else "not submitted")
                                                        for p in LABS}
    assert "## ada" in (tmp_path / "grades" / "report.md").read_text()


def test_cli_help_and_bad_paths(tmp_path):
    for command in ("student", "grade"):
        done = cli(command, "--help")
        assert done.returncode == 0 and "usage: dmd2lab course " + command in done.stdout
    done = cli("grade", tmp_path / "nowhere")
    assert done.returncode == 2 and re.search(r"submissions folder .*nowhere does not exist", done.stderr)
    done = cli("student", tmp_path / "out", "--labs", tmp_path)
    assert done.returncode == 2 and str(tmp_path) in done.stderr and "--labs" in done.stderr
