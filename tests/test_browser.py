"""Real-browser tests: notebook 03 in JupyterLab driven by headless Chromium (Playwright, system Chromium), and the
standalone HTML page opened from disk with every network request blocked.

Screenshots and timings land in ``results/test-artifacts/`` (or ``$REVELIO_TEST_OUTPUT``). The tests skip, with the
reason, only when Chromium (Debian package ``chromium``, installed by ``make browser-deps``) or Playwright is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _chromium() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def chromium():
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; `make browser-deps` installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Python package playwright is not installed (it is in requirements.txt)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    out = Path(os.environ.get("REVELIO_TEST_OUTPUT") or REPO / "results" / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import torch

    from demo_run import demo_run
    from revelio_nb import paths

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return demo_run(paths.cache_dir("demo-run"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout:.0f} s")


# Click a button, resolve with the ms until the stats line changed and the dataset view image was replaced (the last
# thing a slider move updates), -1 after 10 s.
_CLICK_LATENCY_JS = """async (sel) => {
    const root = document.querySelector('.revelio-browser');
    const stats = root.querySelector('.revelio-stats'), scatter = root.querySelector('img.revelio-scatter');
    const old = stats.textContent, oldSrc = scatter.src, t0 = performance.now();
    const done = () => stats.textContent !== old && scatter.src !== oldSrc;
    const result = new Promise(res => {
        const obs = new MutationObserver(() => { if (done()) { obs.disconnect(); res(performance.now() - t0); } });
        obs.observe(root, {subtree: true, childList: true, characterData: true, attributes: true});
        setTimeout(() => { obs.disconnect(); res(-1); }, 10000);
    });
    document.querySelector(sel).click();
    return await result;
}"""


_UPDATED_JS = """(old) => {
    const root = document.querySelector('.revelio-browser');
    const stats = root.querySelector('.revelio-stats').textContent;
    if (stats === old || !stats.startsWith('latent #')) return false;
    const latent = stats.split(' ')[1];  // '#<id>'; the dataset view caption is the last widget a move updates
    return root.textContent.includes('where latent ' + latent + ' fires');
}"""


def _wait_update(page, old_stats: str, timeout_ms: int = 15_000) -> None:
    """Wait until the browser shows another latent completely (stats line through dataset view)."""
    page.wait_for_function(_UPDATED_JS, arg=old_stats, timeout=timeout_ms)


def _accept_kernel_dialog(page) -> None:
    """JupyterLab sometimes asks which kernel to start (the notebook's own python3 is preselected): accept it."""
    dialog = page.locator(".jp-Dialog .jp-mod-accept")
    if dialog.count() and dialog.first.is_visible():
        dialog.first.click()


def _stop(proc: subprocess.Popen) -> None:
    """End the jupyter server we started and its kernels (its own process group)."""
    for sig, wait in ((15, 15), (9, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _state(page) -> dict:
    """What the browser widget shows: stats line, captions, image sources, slider readout."""
    return page.evaluate("""() => {
        const root = document.querySelector('.revelio-browser');
        const q = s => root ? [...root.querySelectorAll(s)] : [];
        const stats = root && root.querySelector('.revelio-stats');
        const visible = e => e.offsetParent && getComputedStyle(e.parentElement).visibility !== 'hidden';
        return {stats: stats ? stats.textContent : '',
                captions: q('.revelio-grid .revelio-caption').filter(visible).map(e => e.textContent.trim()),
                srcs: q('.revelio-grid img').map(e => e.src),
                readout: (q('.revelio-slider .widget-readout')[0] || {}).textContent || ''};
    }""")


def test_notebook_browser_in_jupyterlab(chromium, demo, tmp_path, artifacts):
    import papermill as pm

    root = tmp_path / "lab"
    root.mkdir()
    nb = root / "03_browse_latents.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "03_browse_latents.ipynb"), str(nb), prepare_only=True,
                        parameters={"run_dir": str(demo), "top_n": 8, "max_gallery_latents": 2,
                                    "gallery_images": 2, "html_top_n": 4}, progress_bar=False)
    # render every cell (no windowing), so the widget is in the DOM wherever the notebook is scrolled
    settings = tmp_path / "jcfg" / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    apputils = settings.parent / "apputils-extension"
    apputils.mkdir()
    (apputils / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port = _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "jws"), "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}", "--allow-root",
         "--ServerApp.disable_check_xsrf=True", "--ServerApp.terminals_enabled=False",
         f"--LabApp.workspaces_dir={tmp_path / 'jws'}", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    page = None
    timings: dict[str, float] = {}
    try:
        t0 = time.time()
        _wait_http(f"http://127.0.0.1:{port}/api/status", 90, proc)
        timings["server_start_s"] = time.time() - t0
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/lab/tree/{nb.name}", timeout=90_000)
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
        page.wait_for_timeout(1500)
        _accept_kernel_dialog(page)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
        timings["lab_loaded_s"] = time.time() - t0
        _accept_kernel_dialog(page)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator("li.lm-Menu-item[data-command='runmenu:run-all'], "
                     "li.lm-Menu-item[data-command='notebook:run-all-cells']").first.click()
        end = time.time() + 120
        while not page.evaluate("() => { const s = document.querySelector('.revelio-browser .revelio-stats');"
                                " return !!s && s.textContent.includes('latent #'); }"):
            assert time.time() < end, "the browser widget did not show a latent within 120 s"
            _accept_kernel_dialog(page)
            page.wait_for_timeout(500)
        timings["widget_shown_s"] = time.time() - t0
        # let the remaining cells finish: the kernel handles widget events only between cells
        page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea-output')]"
                               ".some(e => e.textContent.includes('standalone browser:'))", timeout=120_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=30_000)
        timings["notebook_done_s"] = time.time() - t0
        widget = page.locator(".revelio-browser")
        widget.scroll_into_view_if_needed()
        first = _state(page)
        assert first["stats"].startswith("latent #") and "fires on" in first["stats"], first
        assert len(first["captions"]) == 8 and all(c for c in first["captions"]), first
        assert all(s.startswith("blob:") or s.startswith("data:") for s in first["srcs"][:8]), first["srcs"][:3]

        # 1) the "next" button: another latent, other images and stats
        page.locator("button.revelio-next").click()
        _wait_update(page, first["stats"])
        second = _state(page)
        assert second["stats"] != first["stats"] and "rank 2/" in second["stats"], second["stats"]
        assert second["srcs"] != first["srcs"]

        # 2) drag the slider handle to the right: a jump of many ranks
        handle = page.locator(".revelio-slider .noUi-handle").first
        track = page.locator(".revelio-slider .noUi-base, .revelio-slider .noUi-target").first
        hb, tb = handle.bounding_box(), track.bounding_box()
        page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
        page.mouse.down()
        page.mouse.move(tb["x"] + tb["width"] * 0.6, hb["y"] + hb["height"] / 2, steps=8)
        page.mouse.up()
        _wait_update(page, second["stats"])
        page.wait_for_timeout(500)  # the drag sends several values: let the last one arrive
        _wait_update(page, "")
        third = _state(page)
        rank = int(third["stats"].split("rank ")[1].split("/")[0])
        assert rank > 5, third["stats"]
        assert third["readout"].strip() == str(rank - 1), (third["readout"], third["stats"])
        assert third["captions"] != first["captions"] or third["srcs"] != second["srcs"]

        # 3) latency seen in the page: click -> stats line, images and dataset view all updated (not asserted)
        lat = [page.evaluate(_CLICK_LATENCY_JS, "button.revelio-next") for _ in range(6)]
        assert all(v > 0 for v in lat), lat  # every click updated the view
        timings["click_to_full_update_ms_median"] = sorted(lat)[len(lat) // 2]
        timings["click_to_full_update_ms_all"] = lat

        # 4) switch to the spatial hookpoint: heatmaps, other stats
        before = _state(page)["stats"]
        select = page.locator(".revelio-hookpoint select")
        select.select_option(label=next(o for o in select.locator("option").all_text_contents() if "spatial" in o))
        _wait_update(page, before, timeout_ms=30_000)
        fourth = _state(page)
        assert fourth["stats"].startswith("latent #") and "rank 1/" in fourth["stats"]
        widget.scroll_into_view_if_needed()
        shot = artifacts / "browser_jupyterlab.png"
        page.screenshot(path=str(shot), full_page=False)
        widget.screenshot(path=str(artifacts / "browser_jupyterlab_widget.png"))
        assert shot.stat().st_size > 10_000
        assert not [e for e in errors if "revelio" in e.lower()], errors
        (artifacts / "browser_jupyterlab.json").write_text(json.dumps(
            {"timings": timings, "states": [first["stats"], second["stats"], third["stats"], fourth["stats"]]},
            indent=2))
        print("browser timings:", json.dumps(timings))
    except Exception:
        if page is not None:  # keep what the page showed, for the CI log
            page.screenshot(path=str(artifacts / "browser_jupyterlab_failure.png"), full_page=True)
        raise
    finally:
        if page is not None:
            page.close()
        _stop(proc)
        log.close()


def test_static_page_offline(chromium, demo, tmp_path, artifacts):
    from revelio_nb import browse
    from revelio_nb.browse import gallery

    data, problems = gallery.load_all(demo, progress=False)
    assert not problems
    page_path = browse.page.write_html(data, tmp_path / "latents.html", top_n=8)
    page = chromium.new_page(viewport={"width": 1200, "height": 800})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:", "blob:"))
               else route.abort())
    try:
        page.goto(page_path.as_uri())
        page.wait_for_function("() => window.revelioState && window.revelioState.latent !== null", timeout=15_000)
        s0 = page.evaluate("() => ({...window.revelioState})")
        stats0 = page.locator("#stats").inner_text()
        assert stats0.startswith("latent #") and s0["latent"] == int(stats0.split("#")[1].split(" ")[0])
        assert len(s0["images"]) == 8
        # the thumbnails are really drawn (non-black pixels in the first canvas)
        lit = page.evaluate("() => { const c = document.querySelector('#grid canvas');"
                            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                            " let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] + d[i+1] + d[i+2] > 60;"
                            " return n; }")
        assert lit > 50
        page.click("#next")
        s1 = page.evaluate("() => ({...window.revelioState})")
        assert s1["latent"] != s0["latent"] and page.locator("#stats").inner_text() != stats0
        page.fill("#slider", "5")
        page.dispatch_event("#slider", "input")
        s2 = page.evaluate("() => ({...window.revelioState})")
        assert "rank 6/" in page.locator("#stats").inner_text() and s2["latent"] != s1["latent"]
        spatial = [i for i, d in enumerate(data) if d.spatial][0]
        page.select_option("#hp", str(spatial))
        s3 = page.evaluate("() => ({...window.revelioState})")
        assert s3["hookpoint"] == data[spatial].label
        page.select_option("#sort", "index")
        s4 = page.evaluate("() => ({...window.revelioState})")
        assert "rank 1/" in page.locator("#stats").inner_text()
        assert s4["latent"] == int(min(data[spatial].table.loc[~data[spatial].table["dead"], "latent"]))
        page.screenshot(path=str(artifacts / "browser_static_page.png"), full_page=True)
        assert not errors, errors
        assert all(u.startswith(("file:", "data:", "blob:")) for u in requests), requests
    finally:
        page.close()
