"""Nothing from data runs as code: class names, hookpoint labels, model ids and dataset names that are HTML/JS
payloads go through the real pipeline (image folder -> features -> k-SAE -> latent statistics -> run index) into
the static latent page and the ipywidgets browser, and show as text.

The page is checked as text (always) and opened in the real headless Chromium (skipped, with the reason, without
Chromium / Playwright): no dialog, no console error, no request, the names in the DOM as text nodes only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from demo_run import demo_run
from revelio_nb import browse
from revelio_nb.run_index import HookpointIndex

CLASS_PAYLOADS = ['<img src=x onerror=alert(1)>', '<!--', '"\'><svg onload=alert(4)>', '&lt;b&gt; & <b>bold']
LABEL_PAYLOAD = '</script><script>alert(2)</script> · mid_block'
MODEL_PAYLOAD = '</script><!--<script>alert(6)</script>'
DATASET_DIR = 'ds<img src=y onerror=alert(7)>'  # a folder name: the dataset column holds it
RAW_MARKUP = ["<img", "<svg", "<script>alert", "</script><script", "<!--", "&lt;b&gt; & <b>"]


@pytest.fixture(scope="module")
def payload_run(tmp_path_factory):
    """A real run whose class folders, hookpoint labels, model id and dataset folder are payloads."""
    from PIL import Image

    root = tmp_path_factory.mktemp("payloads")
    folder = root / DATASET_DIR
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASS_PAYLOADS):
        (folder / name).mkdir(parents=True)
        for i in range(20):
            img = rng.integers(0, 60, size=(16, 16), dtype=np.uint8)
            img[4 * c:4 * c + 4, :] = 200 + rng.integers(0, 50)  # a class-specific stripe
            Image.fromarray(img).save(folder / name / f"{i}.png")
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    try:
        run = demo_run(root / "run", dataset=str(folder), max_images=None, blocks=("mid_block",),
                               spatial_block="mid_block", expansion=2, k=2, sae_steps=30, top_n=8)
    finally:
        torch.set_num_threads(old)
    index = HookpointIndex(run).path
    table = pd.read_csv(index)
    table["hookpoint"] = [f"{LABEL_PAYLOAD} #{i}" for i in range(len(table))]
    table["model"] = MODEL_PAYLOAD
    table.to_csv(index, index=False)
    return run


@pytest.fixture(scope="module")
def page(payload_run) -> Path:
    path = browse.page.write_static_browser(payload_run, top_n=8)
    assert path is not None
    return path


def _data_block(text: str) -> str:
    return re.search(r'<script type="application/json" id="revelio-data">(.*?)</script>', text, re.S).group(1)


def test_static_page_text_carries_no_markup_from_data(page):
    text = page.read_text()
    for bad in RAW_MARKUP:
        assert bad not in text, f"{bad!r} reached the page raw"
    assert text.count("<script") == 2 and text.count("</script") == 2  # the data block and the page's script
    blob = _data_block(text)
    assert not set("<>&") & set(blob) and "\u2028" not in blob and "\u2029" not in blob
    payload = json.loads(blob)  # and the escaped data still round-trip exactly
    assert [h["label"] for h in payload["hookpoints"]] == [f"{LABEL_PAYLOAD} #{i}" for i in range(2)]
    assert all(h["class_names"] == sorted(CLASS_PAYLOADS) for h in payload["hookpoints"])
    assert all(h["model"] == MODEL_PAYLOAD and h["dataset"].endswith(DATASET_DIR) for h in payload["hookpoints"])
    # the CSP admits exactly the page's one script and style, by hash: no inline handler can run
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text).group(1)
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp and "base-uri 'none'" in csp
    script = re.search(r"<script>(.*?)</script>", text, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
    for body, directive in ((script, "script-src"), (style, "style-src")):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "outerHTML" not in script
    markup = text.replace(script, "").replace(blob, "")
    assert not re.search(r"\son[a-z]+\s*=", markup) and " style=" not in markup  # no handler, no style attribute


class _Markup(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        self.tags.append("<!--")


def _parse(fragment: str) -> _Markup:
    p = _Markup()
    p.feed(fragment)
    p.close()
    return p


def test_widget_html_escapes_everything_from_data(payload_run):
    """Every HTML value the ipywidgets browser shows is built from escaped text: only its own tags, no handler
    attributes, no comment, and the names read back verbatim as text."""
    b = browse.LatentBrowser(payload_run, top_n=8, progress=False)
    assert b.message == "" and b.view is not None, b.message
    shown = []
    for label in b.hookpoint_dd.options:
        b.hookpoint_dd.value = label
        for _ in range(3):
            values = [b.stats_html.value, b.message_html.value, b.bars_html.value, b.scatter_caption.value,
                      b.snapshot_html()] + [cap.value for _, _, cap in b.slots]
            for v in values:
                m = _parse(v)
                assert set(m.tags) <= {"div", "span", "b", "br", "i", "img"}, (m.tags, v[:300])
                assert not [a for a in m.attrs if a[1].lower().startswith("on")], m.attrs
                assert all(v_.startswith("data:image/png") for t, k, v_ in m.attrs if k == "src")
                shown.append("".join(m.text))
            b.step(1)
    text = "\n".join(shown)
    for name in CLASS_PAYLOADS:
        assert name in text, f"class name {name!r} not shown as text"
    assert LABEL_PAYLOAD in text  # the label in the snapshot heading
    assert list(b.hookpoint_dd.options) == [f"{LABEL_PAYLOAD} #{i}" for i in range(2)]  # option text, not HTML
    from revelio_nb.browse import LatentView, bars_html

    view = LatentView(hookpoint="h", latent=0, position=0, count=1, stats={}, images=np.zeros(0, int),
                      values=np.zeros(0), labels=None, label_counts=np.array([1, 2]),
                      class_names=["<img src=x onerror=alert(1)>", "</div><script>alert(3)</script>"],
                      firing_points=np.zeros(0, int), top_points=np.zeros(0, int), n_firing=0)
    m = _parse(bars_html(view))
    assert "script" not in m.tags and "img" not in m.tags
    assert "<img src=x onerror=alert(1)>" in "".join(m.text) and "</div><script>alert(3)</script>" in "".join(m.text)


# ------------------------------------------------------------------------------------------ real browser
def _chromium() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.mark.browser
@pytest.mark.slow
def test_payloads_run_nothing_in_headless_chromium(page):
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; `make browser-deps` installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Python package playwright is not installed (it is in requirements.txt)")
    from test_browser import CHROMIUM_ARGS

    dialogs, errors, requests = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 800})
            tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("request", lambda r: requests.append(r.url))
            tab.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:", "blob:"))
                      else route.abort())
            tab.goto(page.as_uri())
            tab.wait_for_function("() => window.revelioState && window.revelioState.latent !== null", timeout=15_000)
            seen = []
            for hp in range(2):
                tab.select_option("#hp", str(hp))
                for _ in range(4):
                    seen.append(tab.evaluate("""() => ({bars: document.querySelector('#bars').textContent,
                        caps: [...document.querySelectorAll('#grid .cap')].map(e => e.textContent).join('\\n'),
                        stats: document.querySelector('#stats').textContent,
                        option: document.querySelector('#hp').selectedOptions[0].textContent})"""))
                    tab.click("#next")
            tab.wait_for_timeout(300)  # let any late handler (onerror / onload) fire
            dom = tab.evaluate("""() => ({injected: document.querySelectorAll('img, svg, iframe, object, embed').length,
                scripts: document.querySelectorAll('script').length, styles: document.querySelectorAll('style').length,
                handlers: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
                comments: document.createTreeWalker(document, NodeFilter.SHOW_COMMENT).nextNode() !== null,
                latent: window.revelioState.latent, updates: window.revelioState.updates})""")
        finally:
            browser.close()
    assert not dialogs, f"a payload ran: {dialogs}"
    assert not errors, errors
    assert all(u == page.as_uri() or u.startswith(("data:", "blob:")) for u in requests), requests
    assert dom["injected"] == 0 and dom["scripts"] == 2 and dom["styles"] == 1 and dom["handlers"] == 0, dom
    assert not dom["comments"] and dom["latent"] is not None and dom["updates"] >= 8, dom
    bars = "\n".join(s["bars"] for s in seen)
    for name in CLASS_PAYLOADS:
        assert name in bars, f"class name {name!r} is not shown as text in the class bars"
    assert any(name in s["caps"] for s in seen for name in CLASS_PAYLOADS)
    assert {s["option"] for s in seen} == {f"{LABEL_PAYLOAD} #{i}" for i in range(2)}
