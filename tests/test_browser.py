"""The real-client test: every lab run in JupyterLab by a real browser, as a student would run it.

A JupyterLab server (with widgets live: ``DMD2LAB_HEADLESS`` unset) serves copies of the labs whose parameters
cells carry the smoke settings (:func:`dmd2lab.labs.smoke_parameters`). Headless Chromium, driven by Playwright,
opens each lab, runs Run > Run All Cells and waits until the kernel is idle and every code cell has an execution
count. Then, per lab:

* no output anywhere is a Python traceback (JupyterLab renders errors as ``.jp-OutputArea-output`` with mime type
  ``application/vnd.jupyter.stderr``, the same as plain stderr; tracebacks are told apart by their text);
* a lab that calls ``labs.show_widget`` shows its ipywidgets control, and moving it (arrow key on a slider's
  handle, another option in a dropdown) redraws the figure under it (the ``img`` src changes);
* a screenshot of the lab as the student sees it is written to ``runs/screenshots/<lab>.png`` (set
  ``DMD2LAB_SCREENSHOTS=docs/screenshots`` to refresh the committed ones the README shows).

Playwright never downloads a browser here: the system's Chromium (Debian: ``apt-get install chromium``) is
launched by path, and the test is skipped where there is none.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dmd2lab import labs

ROOT = Path(__file__).resolve().parent.parent
# A test run never rewrites tracked files: the committed screenshots are refreshed only when asked.
SCREENSHOTS = ROOT / os.environ.get("DMD2LAB_SCREENSHOTS", "runs/screenshots")
LAB_PATHS = labs.find_labs(ROOT / "labs")

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine (Debian/Ubuntu: sudo apt-get install chromium); the browser test "
                "drives the system's Chromium and never downloads one", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
nbformat = pytest.importorskip("nbformat")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}
LAB_TIMEOUT_S = 120      # Run All to idle, per lab (each lab's smoke settings take 7-15 s of kernel time)
WIDGET_TIMEOUT_S = 60    # a widget redraw
SERVER_TIMEOUT_S = 90    # the server answering after start

STDERR = 'application/vnd.jupyter.stderr'
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|Cell In\[\d+\], line \d+|"
                       r"^\s*\w*(Error|Exception|Interrupt)\b[^\n]*$", re.M)
"""What marks a stderr output as an error: IPython's traceback header, its cell reference, or an exception line.
(Warnings and other stderr text are reported, not failed.)"""

LAB_STATE_JS = """(panel) => {
  const status = panel.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') ?? null;
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim());
  const stderr = [...panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="%s"]')].map(e => e.innerText);
  return {status, prompts, stderr};
}""" % STDERR


# ------------------------------------------------------------------------------------------------ set-up
def smoke_copy(lab: Path, folder: Path) -> Path:
    """Copy a lab into folder with its parameters cell's values set to the smoke settings (tag kept)."""
    nb = nbformat.read(lab, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []))
    values = {**labs.smoke_parameters(lab), "results_path": f"results/{lab.stem}.json"}
    source = cell.source
    for name, value in values.items():
        source, found = re.subn(rf"^{name}\s*=.*$", f"{name} = {value!r}", source, flags=re.M)
        if not found:
            source += f"\n{name} = {value!r}"
    cell.source = source
    for code in (c for c in nb.cells if c.cell_type == "code"):  # the waits below read execution counts
        code.outputs, code.execution_count = [], None
    copy = folder / lab.name
    nbformat.write(nb, copy)
    declared = labs.declared_parameters(copy)
    assert {k: declared[k] for k in values} == values, f"{lab.stem}: smoke parameters not written"
    return copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, port: int, token: str):
        self.root, self.port, self.token = root, port, token
        self.url = f"http://127.0.0.1:{port}"

    def api(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def shut_down_kernels(self) -> None:
        """Free the CPU for the next lab: end every session (and its kernel)."""
        import json
        for session in json.loads(self.api("GET", "/api/sessions")):
            self.api("DELETE", f"/api/sessions/{session['id']}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_labs")
    lab_root, state = root / "labs", root / "jupyter"
    lab_root.mkdir()
    for lab in LAB_PATHS:
        smoke_copy(lab, lab_root)
    # Isolated JupyterLab settings: no news prompt over the page, every cell kept in the DOM (no windowing).
    settings = state / "settings" / "@jupyterlab"
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')

    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in (labs.HEADLESS_ENV, "MPLBACKEND")}  # widgets live, inline figures
    env["JUPYTER_RUNTIME_DIR"] = str(state / "runtime")
    log_path = root / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={lab_root}",
               "--ServerApp.port_retries=0",  # a taken port must fail here, not move the server elsewhere
               f"--LabApp.user_settings_dir={state / 'settings'}", f"--LabApp.workspaces_dir={state / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=lab_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    srv = Server(lab_root, port, token)

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])

    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"jupyter lab exited with code {process.returncode}:\n{log_tail()}")
            try:
                srv.api("GET", "/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer within {SERVER_TIMEOUT_S} s:\n{log_tail()}")
                time.sleep(0.5)
        yield srv
    finally:
        try:  # kernels run in sessions of their own: shut them down through the server, not by its process group
            srv.shut_down_kernels()
        except Exception:  # the server may already be gone; terminating it below still stops what it can
            pass
        process.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the server and its kernels only
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with tempfile.TemporaryDirectory(prefix="dmd2lab-chromium-") as profile, sync_api.sync_playwright() as p:
        try:
            context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                           headless=True, viewport=VIEWPORT)
        except sync_api.Error as e:
            pytest.fail(f"Chromium ({CHROMIUM}) did not start: {e}")
        try:
            yield context
        finally:
            context.close()


# ------------------------------------------------------------------------------------------------ the test
def errors_in(state: dict) -> list[str]:
    return [text for text in state["stderr"] if TRACEBACK.search(text)]


def waited(wait) -> bool:
    """Run a Playwright wait; False on its timeout (so that failures are reported without a chained timeout)."""
    try:
        wait()
        return True
    except sync_api.TimeoutError:
        return False


def has_widget(lab: Path) -> bool:
    nb = nbformat.read(lab, as_version=4)
    return any("labs.show_widget(" in c.source for c in nb.cells if c.cell_type == "code")


def dismiss_dialogs(page) -> list[str]:
    """Close JupyterLab's modal dialogs (seen once under load on a fresh server, covering the menu bar) and return
    their texts, so a failure later can say what was shown."""
    texts = []
    dialog = page.locator(".jp-Dialog")
    while dialog.count():
        texts.append(" ".join(dialog.first.inner_text().split())[:300])
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)
        if len(texts) >= 3:
            break
    return texts


def run_all_cells(page, panel, name: str) -> dict:
    """Run > Run All Cells, then wait until the kernel is idle and every code cell has an execution count.
    Fails at once on a traceback, and when execution stops early (a cell left unrun while the kernel idles)."""
    dialogs = []
    for attempt in range(3):  # right after the page loads the command can still be disabled: open the menu again
        dialogs += dismiss_dialogs(page)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        item = page.locator('.lm-Menu-item[data-command="runmenu:run-all"]')
        if "lm-mod-disabled" not in (item.get_attribute("class") or ""):
            item.click()
            if waited(lambda: page.wait_for_function(  # Run All marks every cell queued ([*]) at once
                    "(p) => p.querySelector('.jp-CodeCell .jp-InputArea-prompt')?.textContent.trim() !== '[ ]:'",
                    arg=panel.element_handle(), timeout=10_000)):
                break
        page.keyboard.press("Escape")
        page.wait_for_timeout(2000)
    else:
        pytest.fail(f"{name}: Run > Run All Cells did not start the lab (three tries); dialogs dismissed: {dialogs}")
    started, stalled_since = time.monotonic(), None
    while True:
        state = panel.evaluate(LAB_STATE_JS)
        errors = errors_in(state)
        if errors:
            pytest.fail(f"{name}: error output while running all cells:\n{errors[0][-3000:]}")
        done = [bool(re.fullmatch(r"\[\d+\]:", p)) for p in state["prompts"]]
        if state["status"] == "idle" and all(done) and done:
            return state
        if state["status"] == "idle" and "[*]:" not in state["prompts"]:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 5:
                pytest.fail(f"{name}: the kernel is idle but cells {[i for i, d in enumerate(done) if not d]} "
                            f"never ran (prompts {state['prompts']})")
        else:
            stalled_since = None
        if time.monotonic() - started > LAB_TIMEOUT_S:
            pytest.fail(f"{name}: the kernel did not finish within {LAB_TIMEOUT_S} s (status {state['status']!r}, "
                        f"prompts {state['prompts']})")
        time.sleep(0.5)


def move_widget(page, widget, name: str) -> str:
    """Move the interact's control one notch; returns what was done (for messages)."""
    handle = widget.locator(".noUi-handle").first
    if handle.count():  # aria-valuetext is the value itself (aria-valuenow is rounded to one decimal)
        before = handle.get_attribute("aria-valuetext")
        key = "ArrowLeft" if float(before) >= float(handle.get_attribute("aria-valuemax")) else "ArrowRight"
        handle.focus()
        handle.press(key)
        if not waited(lambda: page.wait_for_function("([h, v]) => h.getAttribute('aria-valuetext') !== v",
                                                     arg=[handle.element_handle(), before], timeout=10_000)):
            pytest.fail(f"{name}: the widget's slider did not move on {key}")
        return f"slider {before} -> {handle.get_attribute('aria-valuetext')} ({key})"
    select = widget.locator("select").first
    if select.count():
        options = [o.replace("\xa0", " ") for o in select.locator("option").all_text_contents()]
        current = select.input_value()
        values = select.evaluate("s => [...s.options].map(o => o.value)")
        target = next(v for v in values if v != current)
        select.select_option(target)
        return f"dropdown {options[values.index(current)]!r} -> {options[values.index(target)]!r}"
    pytest.fail(f"{name}: the widget has neither a slider nor a dropdown to move")


@pytest.mark.parametrize("lab", LAB_PATHS, ids=lambda p: p.stem)
def test_lab_runs_in_jupyterlab(lab, server, browser):
    name = lab.stem
    page = browser.new_page()
    page.set_default_timeout(30_000)
    try:
        # A workspace of its own: only this lab open, nothing restored from an earlier page.
        page.goto(f"{server.url}/lab/workspaces/{name}/tree/{lab.name}?token={server.token}")
        panel = page.locator(".jp-NotebookPanel").first
        panel.wait_for()
        if not waited(lambda: page.wait_for_function(
                "() => document.querySelector('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator')"
                "?.getAttribute('data-status') === 'idle'", timeout=60_000)):
            pytest.fail(f"{name}: the kernel never became idle after opening the lab")
        state = run_all_cells(page, panel, name)
        assert state["prompts"], f"{name}: no code cells rendered"
        for text in state["stderr"]:
            print(f"{name}: stderr output (not an error): {text[:300]}")
        assert panel.locator(".jp-OutputArea-output[data-mime-type='image/png'] img").count(), \
            f"{name}: no figure was drawn"

        shown = panel.locator(".jp-RenderedImage img").first
        if has_widget(lab):
            widget = panel.locator(".widget-interact").first
            if not waited(lambda: widget.wait_for(timeout=30_000)):
                pytest.fail(f"{name}: calls labs.show_widget but no interactive widget was shown")
            figure = widget.locator(".widget-output img").first
            if not waited(lambda: figure.wait_for(timeout=WIDGET_TIMEOUT_S * 1000)):
                pytest.fail(f"{name}: the widget drew no figure")
            before = figure.get_attribute("src")
            moved = move_widget(page, widget, name)
            changed = ("([w, src]) => { const img = w.querySelector('.widget-output img');"
                       " return img !== null && img.getAttribute('src') !== src; }")
            stderr = f"(w) => w.querySelector('.widget-output [data-mime-type=\"{STDERR}\"]') !== null"
            handle = widget.element_handle()
            redrawn = waited(lambda: page.wait_for_function(  # a new figure, or stderr (a traceback?) instead
                f"([w, src]) => ({changed})([w, src]) || ({stderr})(w)", arg=[handle, before],
                timeout=WIDGET_TIMEOUT_S * 1000))
            errors = errors_in(panel.evaluate(LAB_STATE_JS))
            assert not errors, f"{name}: error output after moving the {moved}:\n{errors[0][-3000:]}"
            if redrawn and not page.evaluate(changed, [handle, before]):  # stderr, not an error: keep waiting
                redrawn = waited(lambda: page.wait_for_function(changed, arg=[handle, before],
                                                                timeout=WIDGET_TIMEOUT_S * 1000))
            if not redrawn:
                pytest.fail(f"{name}: the widget's figure did not redraw within {WIDGET_TIMEOUT_S} s after moving "
                            f"the {moved}")
            shown = widget
        # The student's view: the widget (or the first figure) in a 1280x900 window.
        shown.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)
    finally:
        page.close()
        server.shut_down_kernels()
