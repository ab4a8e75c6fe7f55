"""The latent browser and the static page show each latent's kind (revelio_nb.taxonomy): sort, filter, stats line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from demo_run import demo_run
from revelio_nb import browse
from revelio_nb.browse import BrowserError, LatentBrowser, gallery, sort_latents


@pytest.fixture(scope="module")
def demo():
    from revelio_nb import paths

    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    try:
        yield demo_run(paths.cache_dir("demo-run"))
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def browser(demo):
    return LatentBrowser(demo, top_n=8, progress=False)


def _label(browser, spatial: bool) -> str:
    return next(h for h in browser.hookpoint_dd.options if ("spatial" in h) == spatial)


def _payload(page: Path) -> dict:
    text = page.read_text()
    m = re.search(r'<script type="application/json" id="revelio-data">(.*?)</script>', text, re.DOTALL)
    if m:  # the data block of the escaped page
        return json.loads(m.group(1))
    return json.loads(re.search(r"const D = (\{.*?\});\nconst \$", text, re.DOTALL).group(1).replace("<\\/", "</"))


def test_latent_kinds_sort_filter_and_stats_line(browser):
    from revelio_nb.taxonomy import KINDS, Taxonomy

    b = browser
    b.hookpoint_dd.value = _label(b, spatial=False)
    d = b.data
    tax = Taxonomy.load(d.row["taxonomy_path"]).table
    assert d.table["kind"].tolist() == tax["kind"].tolist()
    assert {"kind", "attribute |rho|"} <= set(browse.available_sorts(d.table))
    assert b.kind_dd.options[0] == browse.ALL_KINDS and not b.kind_dd.disabled
    live_kinds = [k for k in b.kind_dd.options[1:] if k != "dead"]
    assert live_kinds, "the demo SAE should have live latents of some kind"
    b.dead_cb.value = True
    for kind in live_kinds:
        b.kind_dd.value = kind
        expect = set(tax.loc[tax.kind == kind, "latent"])
        assert set(b.order.tolist()) == expect and b.latent in expect
        row = tax.set_index("latent").loc[b.latent]
        assert f"kind: {kind}" in b.stats_text
        if row["best_attribute"]:
            assert f"best attribute {row['best_attribute']}" in b.stats_text
    b.kind_dd.value = browse.ALL_KINDS
    b.sort_dd.value = "kind"  # kinds in taxonomy order, strongest first within a kind
    ranks = [KINDS.index(k) for k in d.table.set_index("latent").loc[b.order, "kind"]]
    assert ranks == sorted(ranks)
    with pytest.raises(BrowserError, match="unknown kind"):
        sort_latents(d.table, "frequency", kind="colourful")
    with pytest.raises(BrowserError, match="no taxonomy"):
        sort_latents(d.table.drop(columns="kind"), "frequency", kind="class")


def test_static_page_carries_kinds_as_text(demo, tmp_path):
    data, _ = gallery.load_all(demo, progress=False)
    page = browse.page.write_html(data[:1], tmp_path / "latents.html", top_n=4)
    p = _payload(page)
    h = p["hookpoints"][0]
    assert h["table"]["kind"] == data[0].table["kind"].tolist()
    assert set(p["kinds"]) == set(data[0].table["kind"]) and p["sortcols"]["kind"] == ["kind_rank", False]
    text = page.read_text()
    assert 'id="kind"' in text and "t.kind[i] !== kf" in text
