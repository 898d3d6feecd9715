"""The head-pruning slider in a real browser: JupyterLab, Chromium, a key press, the observer's answer.

tests/test_widgets.py drives the explorer's controller from Python. That cannot catch what only a
browser sees: the widgets' JupyterLab extension not being found, the slider not sending its value
to the kernel, or the observer's label and plot never reaching the page. Here JupyterLab runs on a
free local port with throwaway config, runtime, data and IPython directories (the venv's
share/jupyter stays on the data path: the widgets' labextension lives there), Chromium opens a
notebook through Playwright, runs all its cells, moves the slider one step with the keyboard and
reads what the observer wrote.

The notebook is notebook 03's explorer cell (copied from the course notebook, so the two cannot
drift apart) on the embedded MiniLM, with magnitude head scores instead of the Taylor scores that
need a calibration pass: running all of notebook 03 takes about two minutes on 2 cores, this test
about forty seconds in all (server, browser, kernel, one slider step).

Needs Debian's ``chromium`` (``/usr/bin/chromium``, or ``COURSE_CHROMIUM``) and the ``playwright``
package; ``make browser`` installs both (Chromium only as root or with sudo). Without them the test
skips and says which is missing. A screenshot of the notebook after the slider moved is saved in
the test's tmp dir and, when ``COURSE_SCREENSHOT_DIR`` is set, there as well.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
COURSE_NOTEBOOK = ROOT / "notebooks" / "03_head_pruning.ipynb"
CHROMIUM = Path(os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium"))
SERVER_START_S = 60
RUN_ALL_S = 90
SLIDER_ANSWER_S = 30

# Only the cheap parts of notebook 03 before its explorer: the embedded baseline and magnitude scores
# (weights only). The rules line is the course notebook's own, inserted below.
CHEAP_SCORES = """\
model, tok, metrics = load_baseline()
scores = head_scores(model, method="magnitude", progress=False)
{rules}
print(f"scores {{tuple(scores.shape)}}, rules {{rules}}")"""


def _course_cell(cells: list[str], marker: str) -> str:
    """The one code cell of notebook 03 that contains ``marker`` (fails loudly if the notebook changed)."""
    found = [source for source in cells if marker in source]
    assert len(found) == 1, f"{COURSE_NOTEBOOK.name}: expected one code cell containing {marker!r}, found {len(found)}"
    return found[0]


def explorer_notebook() -> nbformat.NotebookNode:
    """Notebook 03's setup, imports and explorer cells around cheap scores, as a new notebook."""
    course = nbformat.read(COURSE_NOTEBOOK, as_version=4)
    cells = [cell.source for cell in course.cells if cell.cell_type == "code"]
    rules = [line for source in cells for line in source.splitlines() if line.startswith("rules = ")]
    assert len(rules) == 1, f"{COURSE_NOTEBOOK.name}: expected one line defining the selection rules, found {rules}"
    sources = [
        _course_cell(cells, "profile = setup("),
        _course_cell(cells, "from course_lib.widgets import"),
        CHEAP_SCORES.format(rules=rules[0]),
        _course_cell(cells, "widget, explorer = head_pruning_explorer("),
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    notebook.metadata = course.metadata
    return notebook


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_lab_settings(config_dir: Path) -> None:
    """User settings that keep first-start pop-ups off the page (keys from the jupyterlab 4.6 schemas).

    ``fetchNews`` "false" answers the "receive official Jupyter news?" toast before it is asked,
    ``checkForUpdates`` stops the update check (both would also try to reach the internet);
    ``doNotDisturbMode`` keeps any other toast from covering the notebook.
    """
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}))


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 with the explorer notebook: yields (base url, token, notebook name).

    The MiniLM baseline is built here first when the cache lacks it (a fresh checkout, where this is
    the first test to need it): fine-tuning it takes minutes, which is not what the browser's timeouts measure.
    """
    from course_lib.sentiment import load_baseline

    load_baseline()
    dirs = {name: tmp_path / name for name in ("config", "runtime", "data", "ipython", "work")}
    for d in dirs.values():
        d.mkdir()
    _write_lab_settings(dirs["config"])
    nbformat.write(explorer_notebook(), dirs["work"] / "explorer.ipynb")
    env = {**os.environ,
           "JUPYTER_CONFIG_DIR": str(dirs["config"]),  # also holds lab/user-settings and lab/workspaces
           "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
           "JUPYTER_DATA_DIR": str(dirs["data"]),  # the user data dir only; sys.prefix/share/jupyter stays
           "IPYTHONDIR": str(dirs["ipython"]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    env.pop("MPLBACKEND", None)  # the kernel must use the inline backend, or the plot is a text repr
    env.pop("JUPYTERLAB_SETTINGS_DIR", None)  # these two would take precedence over JUPYTER_CONFIG_DIR
    env.pop("JUPYTERLAB_WORKSPACES_DIR", None)
    port, token = _free_port(), secrets.token_hex(16)
    log = (tmp_path / "lab.log").open("w")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={dirs['work']}",
               "--LabApp.expose_app_in_browser=True",
               "--LabApp.extension_manager=readonly"]  # the default 'pypi' one queries PyPI from the page
    if os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root; the server only listens on 127.0.0.1
    server = subprocess.Popen(command, cwd=dirs["work"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited with {server.returncode}:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer in {SERVER_START_S} s:\n"
                                f"{(tmp_path / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.25)
        yield base, token, "explorer.ipynb"
    finally:
        server.terminate()  # SIGTERM: the server shuts its kernels down without asking
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def browser():
    """Debian's Chromium under Playwright (headless; no sandbox, since tests may run as root)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: `make browser` installs Debian's chromium (needs root or sudo)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `make browser` installs requirements-browser.txt")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


# JavaScript run in the page, through the app that --LabApp.expose_app_in_browser puts on window.
KERNEL_IDLE = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = panel && panel.context && panel.context.sessionContext.session?.kernel;
    return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}"""
# Started here and awaited by polling, so that a hung run fails on the test's timeout, not pytest's.
RUN_ALL = """() => {
    window.courseRunAll = undefined;
    window.jupyterapp.commands.execute('notebook:run-all-cells').then(
        ok => { window.courseRunAll = ok; }, err => { window.courseRunAll = String(err); });
}"""
RAN_ALL = "() => window.courseRunAll !== undefined"
NOT_RUN = """() => window.jupyterapp.shell.currentWidget.content.widgets
    .filter(c => c.model.type === 'code' && c.model.executionCount === null).length"""
ERRORS = """() => {
    const cells = window.jupyterapp.shell.currentWidget.content.widgets;
    return cells.filter(c => c.model.type === 'code').flatMap(c => {
        const outputs = c.model.outputs.toJSON();
        return outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue);
    });
}"""
# The explorer's VBox: slider, label (HTML) and plot (Output). Other cells show HTML widgets too (progress bars).
EXPLORER = ".widget-vbox:has(> .widget-slider)"
LABEL, PLOT = f"{EXPLORER} > .widget-html .widget-html-content", f"{EXPLORER} > .widget-output img"
LABEL_STARTS = f"([prefix]) => document.querySelector('{LABEL}')?.textContent.startsWith(prefix)"
PLOT_CHANGED = f"([src]) => document.querySelector('{PLOT}')?.src !== src"


def _screenshot(page, tmp_path: Path) -> Path:
    path = tmp_path / "browser_widget.png"
    page.screenshot(path=str(path))
    if os.environ.get("COURSE_SCREENSHOT_DIR"):
        target = Path(os.environ["COURSE_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def test_slider_key_press_reprunes_and_redraws(browser, lab, tmp_path):
    base, token, name = lab
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{base}/lab/tree/{name}?token={token}")
    try:
        page.wait_for_function(KERNEL_IDLE, timeout=SERVER_START_S * 1000)
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # the file browser: room for the notebook
        page.evaluate(RUN_ALL)
        page.wait_for_function(RAN_ALL, timeout=RUN_ALL_S * 1000)
        assert page.evaluate(ERRORS) == []
        assert page.evaluate("() => window.courseRunAll") is True and page.evaluate(NOT_RUN) == 0

        # The widget rendered (the labextension was found) with the observer's output for fraction 0.
        label, plot = page.locator(LABEL), page.locator(PLOT)
        page.wait_for_function(LABEL_STARTS, arg=["fraction 0.00: 0 heads removed"], timeout=SLIDER_ANSWER_S * 1000)
        plot.wait_for(timeout=SLIDER_ANSWER_S * 1000)
        before_plot = plot.get_attribute("src")
        assert page.locator(f"{EXPLORER} .widget-readout").inner_text() == "0.00"

        # One step right (1/12 of the heads): the browser sends the value, the kernel's observer re-prunes.
        handle = page.locator(f"{EXPLORER} .noUi-handle")
        handle.focus()
        handle.press("ArrowRight")
        page.wait_for_function(LABEL_STARTS, arg=["fraction 0.08:"], timeout=SLIDER_ANSWER_S * 1000)
        text = label.inner_text()
        removed, requested = map(int, re.search(r"(\d+) heads removed \(requested (\d+)\)", text).groups())
        # 1/12 of 72 heads = 6 requested; pruned layers move in steps of 2 heads (head_dim 32, multiple 64).
        assert requested == 6 and removed in (4, 6)
        assert re.search(r"parameters [\d,]+ \([\d,]+ removed", text) and "accuracy" in text and "latency" in text
        assert page.locator(f"{EXPLORER} .widget-readout").inner_text() == "0.08"
        page.wait_for_function(PLOT_CHANGED, arg=[before_plot], timeout=SLIDER_ANSWER_S * 1000)
        assert plot.count() == 1  # redrawn in place, not appended
    finally:
        if page.locator(EXPLORER).count():
            page.locator(EXPLORER).scroll_into_view_if_needed(timeout=5000)
        _screenshot(page, tmp_path)
