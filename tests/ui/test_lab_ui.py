"""Browser tests: the distribution's Chromium (Playwright, no browser download) against `snapkernel lab`.

Open the launcher, start `snapkernel-python`, run a cell, see the status bar, snapshot the kernel in the
Snapshots panel, resume it there and delete it; start a kernel from the "New GPU kernel…" dialog; move a kernel to
other resources with "Change resources…". Screenshots of each step go to test-artifacts/ui/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts" / "ui"
TOKEN = "ui-test-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.ui, pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium: `make install` installs Debian's `chromium` as root")]
CPU_PRICE = 0.25  # per core-second: big enough that the status bar's cost estimate shows in cents
WAIT_MS = 90_000  # sandbox start, snapshot and restore under gvisor on a busy 2-core machine
STATE_DIRS: dict[str, str] = {}  # lab base URL -> its backend's state dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`snapkernel lab` with its own state dir, root dir and Jupyter dirs; yields its base URL."""
    tmp = tmp_path_factory.mktemp("ui")
    root, port = tmp / "notebooks", _free_port()
    root.mkdir()
    # No "Jupyter news?" pop-up over the screenshots.
    (tmp / "config" / "labconfig").mkdir(parents=True)
    (tmp / "config" / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # This checkout's bundle (`npm run build:prod` builds it) comes first, ahead of the copy the editable install
    # put into the venv, which is the bundle of whichever checkout ran `make install`.
    bundle, extensions = ROOT / "snapkernel" / "labextension", tmp / "labextensions"
    extensions.mkdir()
    if (bundle / "package.json").exists():
        (extensions / "snapkernel").symlink_to(bundle)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAPKERNEL_", "JUPYTER"))}
    env.update(SNAPKERNEL_STATE_DIR=str(tmp / "state"), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    log = open(tmp / "lab.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapkernel.cli", "lab", "--no-browser", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         f"--LabApp.workspaces_dir={tmp / 'workspaces'}", f"--LabApp.user_settings_dir={tmp / 'settings'}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         f"--LabApp.extra_labextensions_path={extensions}",
         f"--SnapKernelApp.cpu_price_per_second={CPU_PRICE}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    STATE_DIRS[base] = str(tmp / "state")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / "lab.log").read_text(errors="replace")[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/snapkernel/api/status?token={TOKEN}", timeout=5):
                    break
            except (OSError, urllib.error.HTTPError):
                assert time.monotonic() < deadline, "JupyterLab did not come up"
                time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print(f"--- snapkernel lab log ---\n{(tmp / 'lab.log').read_text(errors='replace')[-8000:]}")


@pytest.fixture
def page(lab: str) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip extra `test`)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root needs --no-sandbox
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        pg = context.new_page()
        pg.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        yield pg
        browser.close()
        assert not [e for e in errors if "snapkernel" in e], errors


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def run_cell(page: Any, code: str) -> None:
    """Type `code` into the notebook's last cell and run it (Shift+Enter)."""
    editor = page.locator(".jp-NotebookPanel .jp-Cell .cm-content").last
    editor.click()
    page.keyboard.type(code)
    page.keyboard.press("Shift+Enter")


def test_launch_run_status_snapshot_resume(lab: str, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{lab}/lab?token={TOKEN}")
    launcher = page.locator(".jp-Launcher")
    expect(launcher).to_be_visible()
    # snapkernel's own launcher section: the installed kernels by resources, and the dialog.
    expect(launcher.locator(".jp-LauncherCard", has_text="CPU sandbox")).to_be_visible()
    expect(launcher.locator(".jp-LauncherCard", has_text="New GPU kernel…")).to_be_visible()
    shot(page, "01-launcher")

    launcher.locator(".jp-LauncherCard", has_text="Python 3 (snapkernel)").first.click()
    status = page.locator(".snapkernel-StatusItem")
    expect(status).to_contain_text("running")
    run_cell(page, "x = 41 + 1\nx")
    expect(page.locator(".jp-OutputArea-output").last).to_have_text("42")
    shot(page, "02-cell")

    expect(status).to_contain_text("CPU")  # usage arrived: runtime · running · CPU n% · mem … · elapsed
    expect(status).to_contain_text(" · mem ")
    expect(status).to_contain_text("≈$")  # cost estimate from the configured price
    shot(page, "03-statusbar")

    page.locator('.jp-SideBar [data-id="snapkernel-snapshots"]').click()
    panel = page.locator("#snapkernel-snapshots")
    expect(panel).to_be_visible()
    expect(panel.locator(".snapkernel-Snapshots-notebook")).to_have_text("for Untitled.ipynb")
    expect(panel.locator(".snapkernel-Snapshots-create")).to_be_enabled()
    panel.locator(".snapkernel-Snapshots-name").fill("ui-test")
    panel.locator(".snapkernel-Snapshots-create").click()
    item = panel.locator(".snapkernel-Snapshot.snapkernel-mod-own", has_text="ui-test")
    expect(item).to_be_visible()
    expect(item).to_contain_text("this notebook")
    shot(page, "04-snapshot")

    run_cell(page, "x = 0\nx")
    expect(page.locator(".jp-OutputArea-output").last).to_have_text("0")
    item.locator(".snapkernel-Snapshot-resume").click()
    expect(page.locator(".jp-toast-message", has_text="Resumed ui-test")).to_be_visible()
    expect(status).to_contain_text("running")
    run_cell(page, "x")
    expect(page.locator(".jp-OutputArea-output").last).to_have_text("42")  # the snapshot's x, not 0
    shot(page, "05-resumed")

    item.locator(".snapkernel-Snapshot-delete").click()
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-warn").click()
    expect(panel.locator(".snapkernel-Snapshot")).to_have_count(0)
    expect(panel.locator(".snapkernel-Snapshots-empty")).to_be_visible()


def get_json(lab: str, path: str) -> Any:
    with urllib.request.urlopen(f"{lab}/{path}?token={TOKEN}", timeout=10) as reply:
        return json.loads(reply.read())


def test_new_kernel_dialog_starts_a_kernel_with_the_chosen_spec(lab: str, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{lab}/lab/workspaces/dialog?token={TOKEN}")  # a fresh workspace: the launcher shows
    page.locator(".jp-Launcher .jp-LauncherCard", has_text="New GPU kernel…").click()
    form = page.locator(".jp-Dialog .snapkernel-NewKernel")
    expect(form).to_be_visible()
    expect(form.locator('select[name="gpu-model"] option').first).to_have_text("none (CPU only)")
    form.locator('input[name="cpu-cores"]').fill("1")
    form.locator('input[name="memory"]').fill("640Mi")
    form.locator('select[name="runtime"]').select_option("process")
    shot(page, "06-new-kernel-dialog")
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").click()

    status = page.locator(".snapkernel-StatusItem")
    expect(status).to_contain_text("process · running")
    run_cell(page, "import os\nos.environ['SNAPKERNEL_SANDBOX_ID'][:3]")
    expect(page.locator(".jp-OutputArea-output").last).to_have_text("'sb-'")
    shot(page, "07-dialog-kernel")

    sessions = [s for s in get_json(lab, "api/sessions") if s["kernel"]["name"] == "snapkernel-python"]
    chosen = [get_json(lab, f"snapkernel/api/kernels/{s['kernel']['id']}") for s in sessions]
    specs = [k["sandbox"]["spec"] for k in chosen if k["sandbox"]["runtime"] == "process"]
    assert len(specs) == 1 and {"cpu": 1, "memory": "640Mi"}.items() <= specs[0].items(), chosen


def test_hibernation_shows_in_the_status_bar_and_the_next_cell_wakes_the_kernel(lab: str, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{lab}/lab/workspaces/hibernate?token={TOKEN}")
    page.locator(".jp-Launcher .jp-LauncherCard", has_text="Python 3 (snapkernel)").first.click()
    status = page.locator(".snapkernel-StatusItem")
    expect(status).to_contain_text("running")
    run_cell(page, "import os\ny = 7\nos.environ['SNAPKERNEL_SANDBOX_ID']")
    output = page.locator(".jp-OutputArea-output").last
    expect(output).to_contain_text("sb-")
    sandbox = output.inner_text().strip().strip("'")
    env = {**os.environ, "SNAPKERNEL_STATE_DIR": STATE_DIRS[lab]}
    env.pop("SNAPKERNEL_BACKEND", None)
    env.pop("SNAPKERNEL_TOKEN", None)
    subprocess.run([sys.executable, "-m", "snapkernel.cli", "sandboxes", "hibernate", sandbox], env=env,
                   check=True, capture_output=True, timeout=120)
    expect(status).to_contain_text("hibernated")
    expect(page.locator(".jp-toast-message", has_text="Kernel hibernated")).to_be_visible()
    shot(page, "08-hibernated")

    run_cell(page, "y * 6")  # held by the backend while the kernel wakes, then run
    expect(page.locator(".jp-OutputArea-output").last).to_have_text("42")
    expect(status).to_contain_text("running")
    shot(page, "09-woken")


def test_change_resources_moves_the_kernel_with_its_variables(lab: str, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{lab}/lab/workspaces/move?token={TOKEN}")
    page.locator(".jp-Launcher .jp-LauncherCard", has_text="Python 3 (snapkernel)").first.click()
    status = page.locator(".snapkernel-StatusItem")
    expect(status).to_contain_text("running")
    run_cell(page, "x = 41")
    expect(status).to_contain_text(" of 1 ")  # usage arrived: the backend's default limits, 1 core and 4 GiB
    expect(status).to_contain_text("/4 GiB")
    # Every state the item shows, with its tooltip, seen in the page: `moving` may last only a few of its reads.
    page.evaluate("""() => {
        const item = document.querySelector('.snapkernel-StatusItem');
        window.snapkernelSeen = [];
        new MutationObserver(() => window.snapkernelSeen.push([item.dataset.state, item.title]))
            .observe(item, { attributes: true, attributeFilter: ['data-state', 'title'] });
    }""")

    page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").click()
    item = page.locator('.lm-Menu-item[data-command="snapkernel:change-resources"]')
    expect(item).to_have_text("Change resources…")
    expect(item).not_to_have_class(re.compile(r"\blm-mod-disabled\b"))
    shot(page, "10-kernel-menu")
    page.keyboard.press("Escape")

    status.click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog.locator(".jp-Dialog-header")).to_have_text("Change resources")
    form = dialog.locator(".snapkernel-NewKernel")
    expect(form.locator('input[name="cpu-cores"]')).to_have_value("1")  # what it has, defaults included
    expect(form.locator('input[name="memory"]')).to_have_value("4Gi")
    expect(form.locator('select[name="gpu-model"]')).to_have_value("")
    expect(form.locator(".snapkernel-NewKernel-fallback")).to_be_hidden()  # no GPU to fall back from
    form.locator('input[name="cpu-cores"]').fill("2")
    form.locator('input[name="memory"]').fill("1Gi")
    shot(page, "11-change-resources-dialog")
    dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
    try:  # a picture of the move under way, where it lasts long enough to catch
        expect(status).to_have_attribute("data-state", "moving", timeout=5000)
        shot(page, "12-moving")
    except AssertionError:
        pass

    expect(page.locator(".jp-toast-message", has_text="Moved the kernel to cpu 2, memory 1Gi")).to_be_visible()
    expect(status).to_contain_text(" of 2 ")
    expect(status).to_contain_text("/1 GiB")
    expect(status).to_contain_text("running")
    seen = page.evaluate("window.snapkernelSeen")
    # While moving, the tooltip has the step the backend is at ("moving to … : saving the kernel", "starting …").
    assert [t for s, t in seen if s == "moving" and ("moving to" in t or "starting" in t)], seen
    shot(page, "13-moved")
    run_cell(page, "x + 1")
    expect(page.locator(".jp-OutputArea-output").last).to_have_text("42")

    sessions = [s for s in get_json(lab, "api/sessions") if s["path"].endswith(".ipynb")]
    moved = [get_json(lab, f"snapkernel/api/kernels/{s['kernel']['id']}") for s in sessions]
    specs = [k["sandbox"]["spec"] for k in moved if k["sandbox"] and k["sandbox"]["spec"].get("memory") == "1Gi"]
    assert len(specs) == 1 and specs[0]["cpu"] == 2, moved


def test_change_resources_of_a_gpu_kernel_to_no_gpu_asks_to_move_its_tensors(lab: str, page: Any) -> None:
    """The dialog of a GPU kernel. This host has none, so the page is told its kernel has an H100; the backend,
    which knows better, refuses the move to no GPU as one that changes nothing."""
    from playwright.sync_api import expect

    def gpu_kernel(route: Any) -> None:
        reply = route.fetch()
        body = reply.json()
        if body.get("sandbox"):
            body["sandbox"]["spec"]["gpu"] = "H100"
        route.fulfill(response=reply, json=body)

    page.route(re.compile(r".*/snapkernel/api/kernels/[^/?]+(\?.*)?$"), gpu_kernel)
    moves: list[Any] = []
    page.on("request", lambda r: moves.append(json.loads(r.post_data or "null")) if "/move" in r.url else None)
    page.goto(f"{lab}/lab/workspaces/fallback?token={TOKEN}")
    page.locator(".jp-Launcher .jp-LauncherCard", has_text="Python 3 (snapkernel)").first.click()
    status = page.locator(".snapkernel-StatusItem")
    expect(status).to_contain_text("running")

    status.click()
    form = page.locator(".jp-Dialog .snapkernel-NewKernel")
    expect(form.locator('select[name="gpu-model"]')).to_have_value("H100")
    expect(form.locator('select[name="gpu-model"] option:checked')).to_have_text("H100 (current)")
    fallback = form.locator(".snapkernel-NewKernel-fallback")
    expect(fallback).to_be_hidden()
    form.locator('select[name="gpu-model"]').select_option("")
    expect(fallback).to_be_visible()
    expect(fallback).to_have_text("Move GPU tensors to host memory")
    fallback.locator("input").check()
    shot(page, "14-gpu-to-cpu-dialog")
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").click()

    expect(page.locator(".jp-toast-message", has_text="Could not move the kernel: sandbox sb-")).to_contain_text(
        "already")
    assert moves == [{"gpu": "", "allow_cpu_fallback": True}], moves
    shot(page, "15-move-refused")
