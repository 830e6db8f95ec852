"""Running the labs: inside a notebook (setup, parameter checks, results) and in batch (papermill).

Inside a lab::

    lab = labs.start(globals())          # first line after the parameters cell: checks papermill's parameters
    ...
    labs.finish(results_path, claims={...}, metrics={...})   # writes the results JSON, then asserts the claims

In batch, :func:`run_labs` executes every ``labs/NN_*.ipynb`` with papermill into ``runs/``, collects each lab's
results JSON and writes ``runs/summary.md``; ``dmd2lab labs run`` is its command line.
"""
from __future__ import annotations

import ast
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

HEADLESS_ENV = "DMD2LAB_HEADLESS"
"""Set to 1 by the batch runner and the test suite: widgets are skipped, static figures still drawn."""

PAPERMILL_HEADER = "# Parameters"

SMOKE_PARAMETERS: dict[str, dict[str, object]] = {
    "01": dict(teacher_steps=50, generator_steps=20, oracle_generator_steps=10, num_eval=300),
    "02": dict(teacher_steps=50, generator_steps=20, regression_pairs=128, num_eval=300),
    "03": dict(teacher_steps=50, warm_start_steps=20, generator_steps=10, num_real=500, num_eval=300),
    "04": dict(teacher_steps=50, generator_steps=20, num_real=500, num_eval=300, num_mismatch=64),
    "05": dict(teacher_steps=2, num_images=32, speed_images=8, live_steps=10, live_batch=4),
    "06": dict(steps=2, batch_size=2, num_pairs=8, teacher_steps=4, speed_batches=1),
    "07": dict(teacher_steps=50, warm_start_steps=20, exact_steps=10, generator_steps=10, guided_steps=10,
               multistep_steps=20, num_pairs=128, num_real=500, num_eval=300),
}
"""Each lab's tiny settings for a smoke run (every cell executes in seconds; the claims are reported, not checked):
what ``dmd2lab labs run --smoke``, the course kit's student-copy runs and the browser test use."""
REQUIRED = {"seed", "quick", "device", "results_path", "check_claims"}


def _is_injected(source: str) -> bool:
    return source.lstrip().split("\n", 1)[0].strip() == PAPERMILL_HEADER


@dataclass
class LabContext:
    seed: int
    quick: bool
    device: str


def _assigned(source: str) -> dict[str, object]:
    """Names assigned at the top level of a cell, with their literal values (None when not a literal)."""
    values = {}
    try:
        body = ast.parse(source).body
    except SyntaxError:  # e.g. a cell with IPython magics: it declares nothing we can read
        return values
    for node in body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    try:
                        values[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        values[target.id] = None
    return values


def check_injected_parameters(parameters_cell: str, injected_cell: str) -> None:
    """Reject parameters that the lab does not declare, or whose type differs from the default's.

    papermill only logs unknown names, so a typo (``-p quik False``) would silently run the default; this makes
    it an error that names the parameter and lists the valid ones."""
    declared, injected = _assigned(parameters_cell), _assigned(injected_cell)
    unknown = sorted(set(injected) - set(declared))
    if unknown:
        raise ValueError(f"unknown lab parameter(s) {', '.join(unknown)}; this lab accepts: "
                         f"{', '.join(sorted(declared))}")
    for name, value in injected.items():
        problem = _type_problem(name, declared[name], value)
        if problem:
            raise TypeError(problem)


def _type_problem(name: str, default, value) -> str | None:
    """Why ``value`` does not fit a parameter whose default is ``default`` (None when it fits, or either is None):
    the same type, an int for a float, never a bool for a number."""
    if default is None or value is None:
        return None
    ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
    if isinstance(default, (int, float)) and isinstance(value, bool) and not isinstance(default, bool):
        ok = False
    return None if ok else (f"lab parameter {name!r} must be {type(default).__name__} (default {default!r}); "
                            f"got {value!r} ({type(value).__name__})")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else must name a usable torch device."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {device!r} is not usable here ({e}); pass device='auto' or 'cpu'") from e
    return device


def check_parameters(counts: dict[str, object] | None = None, positive: dict[str, object] | None = None) -> None:
    """Reject a lab's bad parameter values one at a time, naming the parameter: ``counts`` must be integers >= 1,
    ``positive`` numbers > 0. (Types are checked by :func:`start`; a None default admits any type, so ranges are
    checked here.)"""
    for name, value in (counts or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lab parameter {name!r} must be an integer >= 1; got {value!r}")
    for name, value in (positive or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"lab parameter {name!r} must be a number > 0; got {value!r}")


def start(namespace: dict, cpu_threads: int = 1) -> LabContext:
    """Call first thing after the parameters cell with ``globals()``: checks papermill-injected parameters
    (read from the kernel's input history), seeds everything, and sets ``cpu_threads`` for work on the CPU
    whatever the device (one thread is 4-50x faster than two on small MLPs under contention, and the labs'
    claims were measured on one; denormal flushing ~10x)."""
    import numpy as np
    import torch
    history = namespace.get("In") or []
    # In[-1] is this cell; papermill executes its injected cell (first line exactly "# Parameters") right before
    # it, after the lab's parameters cell. Without injection, In[-2] is the lab's own parameters cell.
    if len(history) >= 3 and _is_injected(history[-2]) and REQUIRED <= set(_assigned(history[-3])):
        check_injected_parameters(history[-3], history[-2])
    for name in sorted(REQUIRED):
        if name not in namespace:
            raise NameError(f"the lab's parameters cell must define {name!r}")
    seed, quick = namespace["seed"], namespace["quick"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int; got {seed!r}")
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be True or False; got {quick!r}")
    if not isinstance(namespace["check_claims"], bool):
        raise TypeError(f"check_claims must be True or False; got {namespace['check_claims']!r}")
    device = resolve_device(namespace["device"])
    torch.set_num_threads(cpu_threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return LabContext(seed=seed, quick=quick, device=device)


def finish(results_path: str | Path, claims: dict[str, bool], metrics: dict[str, float], check: bool = True,
           **extra) -> dict:
    """Write ``{"claims", "metrics", ...}`` to results_path (atomically), then assert every claim.

    ``check=False`` (a lab's ``check_claims`` parameter) is for smoke runs with tiny settings, where the claims are
    not expected to hold: failed claims are printed instead of raised, and metrics that are not finite are left out
    of the JSON (listed under ``non_finite_metrics``) instead of failing."""
    values = {}
    for k, v in metrics.items():
        try:
            values[k] = float(v)  # ints, floats, numpy and 0-d tensor scalars
        except (TypeError, ValueError):
            raise TypeError(f"metric {k!r} must be a number; got {type(v).__name__}") from None
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad and check:
        raise ValueError(f"metrics must be finite; not so for {', '.join(bad)}")
    if bad:
        values = {k: v for k, v in values.items() if k not in bad}
        extra = {**extra, "non_finite_metrics": bad}
    results = {"claims": {k: bool(v) for k, v in claims.items()}, "metrics": values, "claims_checked": check, **extra}
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    failed = [k for k, v in results["claims"].items() if not v]
    if failed and check:
        raise AssertionError(f"claims that did not hold: {', '.join(failed)}; metrics: {results['metrics']}")
    if failed:
        print(f"claims not checked (check_claims=False); these did not hold: {', '.join(failed)}")
    return results


def show_widget(function, **controls):
    """Wrap ``function(**values)`` in ipywidgets sliders when a person is at the kernel; headless runs (the
    batch runner, the tests) skip it, and the static call the lab makes beforehand is what they see."""
    if os.environ.get(HEADLESS_ENV) == "1":
        return None
    try:
        import ipywidgets
        from IPython import get_ipython
    except ImportError:
        return None
    if get_ipython() is None or not hasattr(get_ipython(), "kernel"):
        return None
    import matplotlib.pyplot as plt

    def draw(**values):  # interact would print a returned Axes; show the figure instead
        function(**values)
        plt.show()

    ipywidgets.interact(draw, **controls)  # it displays itself; returned, the notebook would print it again


# ---------------------------------------------------------------------------------------------- batch runs
def find_labs(lab_dir: str | Path) -> list[Path]:
    lab_dir = Path(lab_dir)
    labs = sorted(lab_dir.glob("[0-9][0-9]_*.ipynb"))
    if not labs:
        raise FileNotFoundError(f"no labs (NN_name.ipynb) found in {lab_dir.resolve()}; run from the repository "
                                "root or pass --labs DIR")
    return labs


def declared_parameters(notebook: Path) -> dict[str, object]:
    import nbformat
    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook} must have exactly one code cell tagged 'parameters'; found {len(cells)}")
    return _assigned(cells[0].source)


def execute_lab(notebook: Path, executed: Path, results_path: Path, parameters: dict,
                timeout: int | None = None) -> dict:
    """Execute one lab headless with papermill (in its own folder) and read its results JSON. A failing lab is
    a result, not an exception: returns ok, wall_s, claims, metrics and the error's last line (or None)."""
    import papermill
    os.environ[HEADLESS_ENV] = "1"
    results_path.unlink(missing_ok=True)
    started, error = time.perf_counter(), None
    try:
        papermill.execute_notebook(str(notebook), str(executed), kernel_name="python3", progress_bar=False,
                                   parameters={**parameters, "results_path": str(results_path)},
                                   cwd=str(notebook.parent.resolve()), execution_timeout=timeout)
    except Exception as e:  # papermill wraps the cell's exception; the caller keeps going with other runs
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"claims": {}, "metrics": {}}
    claims = results["claims"]
    checked = results.get("claims_checked", True)
    return {"ok": bool(error is None and (not checked or (claims and all(claims.values())))),
            "wall_s": round(time.perf_counter() - started, 1), "claims": claims, "metrics": results["metrics"],
            "error": error}


def smoke_parameters(lab: str | Path) -> dict[str, object]:
    """A lab's smoke-run parameters (:data:`SMOKE_PARAMETERS` by its number, with ``check_claims=False``)."""
    number = Path(lab).stem[:2]
    if number not in SMOKE_PARAMETERS:
        raise ValueError(f"lab {Path(lab).stem} has no smoke settings; add its tiny parameters to "
                         f"dmd2lab.labs.SMOKE_PARAMETERS[{number!r}]")
    return {**SMOKE_PARAMETERS[number], "check_claims": False}


def run_labs(lab_dir: str | Path = "labs", out_dir: str | Path = "runs", only: list[str] | None = None,
             parameters: dict | None = None, timeout: int = 1800, smoke: bool = False) -> int:
    """Execute the labs headless with papermill, write ``out_dir/<lab>.ipynb``, ``<lab>.json`` and
    ``summary.md`` / ``summary.json``; return the number of labs that failed. ``smoke``: each lab's tiny
    settings (:func:`smoke_parameters`, under any ``parameters`` given), claims reported but not checked."""
    labs = all_labs = find_labs(lab_dir)
    if only:
        labs = [p for p in labs if any(p.stem.startswith(o) or p.stem == o for o in only)]
        if not labs:
            raise ValueError(f"--only {only} matches no lab in {lab_dir}; the labs are "
                             f"{', '.join(p.stem for p in all_labs)} (a prefix such as 01 is enough)")
    parameters = dict(parameters or {})
    if "results_path" in parameters:
        raise ValueError("results_path is set per lab by the runner (<out>/<lab>.json); choose the folder with --out")
    declared = {p: declared_parameters(p) for p in labs}
    unknown = [k for k in parameters if not any(k in d for d in declared.values())]
    if unknown:
        valid = sorted({k for d in declared.values() for k in d} - {"results_path"})
        raise ValueError(f"parameter(s) {', '.join(unknown)} are declared by none of the selected labs; they "
                         f"accept: {', '.join(valid)} (`dmd2lab labs list` shows each lab's)")
    # Types are checked here, as each lab's start() would, so a wrong value fails at once instead of once per lab
    # after a kernel has started.
    for lab in labs:
        for name, value in parameters.items():
            problem = _type_problem(name, declared[lab].get(name), value)
            if problem:
                raise ValueError(f"{problem}, in {lab.stem}")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; pass a folder for the executed labs (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for lab in labs:
        params = {**(smoke_parameters(lab) if smoke else {}),
                  **{k: v for k, v in parameters.items() if k in declared[lab]}}
        row = {"lab": lab.stem, **execute_lab(lab, out / lab.name, out / f"{lab.stem}.json", params, timeout)}
        rows.append(row)
        print(f"{'PASS' if row['ok'] else 'FAIL'} {lab.stem} ({row['wall_s']} s) "
              f"{sum(row['claims'].values())}/{len(row['claims'])} claims held"
              + (f" — {row['error']}" if row['error'] else ""), flush=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "summary.md").write_text(summary_table(rows))
    print(summary_table(rows))
    return sum(not r["ok"] for r in rows)


def summary_table(rows: list[dict]) -> str:
    lines = ["| lab | status | wall (s) | claim | held |", "|---|---|---|---|---|"]
    for r in rows:
        status = "pass" if r["ok"] else f"FAIL{' (' + r['error'] + ')' if r['error'] else ''}"
        claims = r["claims"] or {"(no results written)": False}
        for i, (name, held) in enumerate(claims.items()):
            lines.append(f"| {r['lab'] if i == 0 else ''} | {status if i == 0 else ''} | "
                         f"{r['wall_s'] if i == 0 else ''} | {name} | {'yes' if held else 'NO'} |")
    return "\n".join(lines) + "\n"
