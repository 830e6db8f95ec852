"""Notebook conventions, parameter checking, results, and the papermill batch runner end to end."""
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dmd2lab import labs

ROOT = Path(__file__).resolve().parent.parent
LABS = sorted((ROOT / "labs").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_labs():
    assert LABS, "no labs found"


@pytest.mark.parametrize("path", LABS, ids=lambda p: p.stem)
def test_lab_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them (executed copies belong in runs/)"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", LABS, ids=lambda p: p.stem)
def test_lab_follows_the_conventions(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    declared = labs.declared_parameters(path)
    assert {"seed", "quick", "device", "results_path"} <= set(declared)
    assert declared["quick"] is True, "the defaults are the quick CPU run"
    assert "labs.start(globals())" in code[1].source, "the cell after the parameters must call labs.start"
    assert "labs.finish(" in code[-1].source, "the last cell must write and assert the results"
    # Exercises: a solution region the nbgrader way, followed at once by a locked, graded check cell.
    solutions = [i for i, c in enumerate(code) if "### BEGIN SOLUTION" in c.source]
    assert solutions, "every lab has at least one exercise"
    for i in solutions:
        assert code[i].source.count("### BEGIN SOLUTION") == code[i].source.count("### END SOLUTION")
        assert code[i].metadata["nbgrader"]["solution"] is True
        check = code[i + 1].metadata.get("nbgrader", {})
        assert check.get("grade") is True and check.get("locked") is True and check.get("points", 0) > 0


@pytest.mark.parametrize("path", LABS, ids=lambda p: p.stem)
def test_lab_code_stays_thin(path):
    """Notebooks import the library; training loops and losses are never pasted outside a solution region."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outside = re.sub(r"### BEGIN SOLUTION.*?### END SOLUTION", "", cell.source, flags=re.S)
        assert ".backward(" not in outside and "optim." not in outside, cell.source[:80]


DECLARED = "seed = 0\nquick = True\nrate = 0.5\nname = 'ring'\nsteps = None\n"


@pytest.mark.parametrize("injected, error, message", [
    ("# Parameters\nquik = False\n", ValueError, "unknown lab parameter.*quik.*accepts: name, quick, rate, seed, steps"),
    ("# Parameters\nquick = 'no'\n", TypeError, "'quick' must be bool"),
    ("# Parameters\nseed = 1.5\n", TypeError, "'seed' must be int"),
    ("# Parameters\nseed = True\n", TypeError, "'seed' must be int"),
    ("# Parameters\nname = 3\n", TypeError, "'name' must be str"),
])
def test_injected_parameters_are_checked(injected, error, message):
    with pytest.raises(error, match=message):
        labs.check_injected_parameters(DECLARED, injected)


def test_good_injected_parameters_pass():
    labs.check_injected_parameters(DECLARED, "# Parameters\nseed = 3\nrate = 1\nsteps = 100\nquick = False\n")


def test_finish_writes_results_before_asserting(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(AssertionError, match="did not hold: b"):
        labs.finish(path, {"a": True, "b": False}, {"x": 1.5})
    assert json.loads(path.read_text()) == {"claims": {"a": True, "b": False}, "metrics": {"x": 1.5}, "claims_checked": True}
    with pytest.raises(ValueError, match="finite"):
        labs.finish(path, {"a": True}, {"x": float("nan")})


def _lab(path: Path, body: str):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("seed = 0\nquick = True\ndevice = 'cpu'\nresults_path = 'r.json'\ncheck_claims = True\nmargin = 1.0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("from dmd2lab import labs\nlab = labs.start(globals())"),
                nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dmd2lab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_batch_runner_runs_labs_writes_summary_and_fails_on_a_broken_claim(tmp_path):
    (tmp_path / "labs").mkdir()
    _lab(tmp_path / "labs" / "01_good.ipynb", "labs.finish(results_path, {'holds': seed + margin > 0}, {'m': margin})")
    _lab(tmp_path / "labs" / "02_bad.ipynb", "labs.finish(results_path, {'holds': margin > 5}, {'m': margin})")
    result = _cli("labs", "run", "--labs", "labs", "--out", "out", "-p", "margin", "2.0", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["lab"], r["ok"]) for r in summary] == [("01_good", True), ("02_bad", False)]
    assert summary[0]["metrics"] == {"m": 2.0}
    assert "| 02_bad | FAIL" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "01_good.ipynb").exists()

    only_good = _cli("labs", "run", "--labs", "labs", "--out", "out2", "--only", "01", cwd=tmp_path)
    assert only_good.returncode == 0, only_good.stdout + only_good.stderr


def test_batch_runner_rejects_unknown_parameters_before_running(tmp_path):
    (tmp_path / "labs").mkdir()
    _lab(tmp_path / "labs" / "01_good.ipynb", "labs.finish(results_path, {'ok': True}, {})")
    result = _cli("labs", "run", "--labs", "labs", "-p", "quik", "False", cwd=tmp_path)
    assert result.returncode == 2
    assert "quik" in result.stderr and "declared by none" in result.stderr
    missing = _cli("labs", "run", "--labs", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "no labs" in missing.stderr


def test_papermill_run_with_a_typo_fails_inside_the_lab(tmp_path):
    import papermill
    _lab(tmp_path / "01_good.ipynb", "labs.finish(results_path, {'ok': True}, {})")
    with pytest.raises(papermill.PapermillExecutionError, match="unknown lab parameter.*marg"):
        papermill.execute_notebook(str(tmp_path / "01_good.ipynb"), str(tmp_path / "o.ipynb"),
                                   parameters={"marg": 3}, kernel_name="python3", cwd=str(tmp_path),
                                   progress_bar=False)


def test_widget_is_skipped_headless_and_outside_a_kernel(monkeypatch):
    calls = []
    monkeypatch.setenv(labs.HEADLESS_ENV, "1")
    assert labs.show_widget(lambda s: calls.append(s), s=(0.0, 1.0)) is None
    monkeypatch.delenv(labs.HEADLESS_ENV)
    assert labs.show_widget(lambda s: calls.append(s), s=(0.0, 1.0)) is None  # plain Python: no kernel
    assert calls == []


def test_lab_runs_top_to_bottom_like_a_front_end_without_parameters(tmp_path):
    """Jupyter's Run All, nbconvert --execute and papermill without -p keep the kernel's input history and inject
    nothing: labs.start must not mistake the lab's own parameters cell (even one whose comment starts with
    '# Parameters') for papermill's injected cell."""
    import nbclient
    _lab(tmp_path / "01_x.ipynb", "labs.finish(results_path, {'ok': margin == 1.0}, {'m': margin})")
    nb = nbformat.read(tmp_path / "01_x.ipynb", as_version=4)
    nb.cells[0].source = "# Parameters: papermill -p NAME VALUE overrides these\n" + nb.cells[0].source
    nbclient.NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert json.loads((tmp_path / "r.json").read_text())["claims"] == {"ok": True}


def test_finish_accepts_numpy_and_tensor_scalars_and_names_a_non_number(tmp_path):
    import numpy as np
    import torch
    out = labs.finish(tmp_path / "r.json", {"a": True}, {"x": np.float32(1.5), "y": torch.tensor(2)})
    assert out["metrics"] == {"x": 1.5, "y": 2.0}
    with pytest.raises(TypeError, match="metric 'z' must be a number"):
        labs.finish(tmp_path / "r.json", {"a": True}, {"z": "high"})


@pytest.mark.parametrize("raw, value", [("1e-3", 0.001), ("None", None), ("False", False), ("3", 3), ("no", "no"),
                                        ("ring", "ring")])
def test_cli_reads_parameter_values_like_papermill(raw, value):
    from dmd2lab.cli import parameter_value
    assert parameter_value(raw) == value and type(parameter_value(raw)) is type(value)


def test_runner_refuses_a_results_path_parameter(tmp_path):
    with pytest.raises(ValueError, match="--out"):
        labs.run_labs(ROOT / "labs", tmp_path, parameters={"results_path": "x.json"})


def test_check_parameters_names_the_bad_parameter():
    from dmd2lab.labs import check_parameters
    check_parameters(counts={"steps": 3}, positive={"lr": 1e-3, "weight": 2})
    for counts, positive, name in [({"steps": 0}, {}, "steps"), ({"steps": 2.5}, {}, "steps"),
                                   ({"steps": True}, {}, "steps"), ({}, {"lr": -1.0}, "lr"),
                                   ({}, {"lr": float("nan")}, "lr"), ({}, {"lr": "fast"}, "lr")]:
        with pytest.raises(ValueError, match=f"'{name}'"):
            check_parameters(counts, positive)


def test_finish_without_checking_reports_and_drops_non_finite(tmp_path, capsys):
    path = tmp_path / "r.json"
    results = labs.finish(path, {"a": True, "b": False}, {"x": 1.5, "y": float("nan")}, check=False)
    assert results["claims_checked"] is False and results["non_finite_metrics"] == ["y"]
    assert json.loads(path.read_text())["metrics"] == {"x": 1.5}
    assert "did not hold: b" in capsys.readouterr().out


def test_every_lab_has_smoke_settings_it_declares():
    for path in LABS:
        declared = labs.declared_parameters(path)
        smoke = labs.smoke_parameters(path)
        assert smoke["check_claims"] is False
        unknown = set(smoke) - set(declared)
        assert not unknown, f"{path.name}: smoke parameters {unknown} are not declared by the lab"
    with pytest.raises(ValueError, match="SMOKE_PARAMETERS"):
        labs.smoke_parameters("99_unknown.ipynb")
