"""Latent browser logic (no browser): hookpoint index validation, ordering, what the widget selects and shows,
clear messages instead of tracebacks, firing index and embedding caches, and the static gallery / page."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from demo_run import demo_run
from revelio_nb import browse
from revelio_nb.browse import BrowserError, LatentBrowser, gallery, sort_latents
from revelio_nb.latent_store import LatentStats
from revelio_nb.run_index import HookpointIndex, RunIndexError


def read_hookpoints(run_dir, extra_roots=()):
    return HookpointIndex(run_dir, extra_roots).read()


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


# ---------------------------------------------------------------------------------------------- the index
def _write_index(run_dir: Path, rows: list[dict]) -> None:
    (run_dir / "sae").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(run_dir / "sae" / "hookpoints.csv", index=False)


ROW = {"hookpoint": "m · mid_block · t=25", "model": "m", "block": "mid_block", "t": 25, "pooling": "mean",
       "sae_dir": "a/sae", "latents_dir": "a/latents", "store_dir": "/abs/store", "dataset": "digits", "split": "test"}


def test_read_hookpoints_validates_with_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sae/hookpoints.csv.*notebook 02"):
        read_hookpoints(tmp_path)
    _write_index(tmp_path, [{k: v for k, v in ROW.items() if k != "store_dir"}])
    with pytest.raises(RunIndexError, match=r"lacks the columns \['store_dir'\]"):
        read_hookpoints(tmp_path)
    _write_index(tmp_path, [{**ROW, "pooling": "max"}])
    with pytest.raises(RunIndexError, match=r"row 0, column pooling 'max' is not one of \['mean', 'map'\]"):
        read_hookpoints(tmp_path)
    _write_index(tmp_path, [ROW, ROW])
    with pytest.raises(RunIndexError, match="unique"):
        read_hookpoints(tmp_path)
    _write_index(tmp_path, [{**ROW, "t": "late"}])
    with pytest.raises(RunIndexError, match="integer timesteps"):
        read_hookpoints(tmp_path)
    (tmp_path / "sae" / "hookpoints.csv").write_text(",".join(HookpointIndex.REQUIRED_COLUMNS) + "\n")
    with pytest.raises(RunIndexError, match="no hookpoints"):
        read_hookpoints(tmp_path)
    # relative paths: against the CSV's folder (sae/), else against the run folder
    (tmp_path / "sae" / "a" / "latents").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    _write_index(tmp_path, [{**ROW, "sae_dir": "a", "store_dir": str(tmp_path / "stores" / "s")}])
    t = read_hookpoints(tmp_path)
    assert t.loc[0, "latents_dir"] == str((tmp_path / "sae" / "a" / "latents").resolve())
    assert t.loc[0, "store_dir"] == str((tmp_path / "stores" / "s").resolve()) and t.loc[0, "embedding_store_dir"] == ""
    assert t.loc[0, "t"] == 25


@pytest.mark.parametrize("column", ["sae_dir", "latents_dir", "store_dir", "embedding_store_dir"])
@pytest.mark.parametrize("value", ["../../etc", "/etc", "sae/../../../../etc/x", "~/elsewhere", "link/inside"])
def test_index_paths_must_stay_in_the_run_or_cache_folder(tmp_path, column, value):
    """A crafted hookpoints.csv cannot point the browser (reads, and its cache writes) outside the run folder or
    the cache folder: relative escapes, absolute paths and symlinks that lead out are refused by name."""
    from revelio_nb.paths import cache_dir

    run = tmp_path / "run"
    (run / "sae").mkdir(parents=True)
    (run / "sae" / "link").symlink_to(tmp_path.parent, target_is_directory=True)  # in the run, leads out of it
    _write_index(run, [{**ROW, "store_dir": "stores/s", column: value}])
    with pytest.raises(RunIndexError) as e:
        read_hookpoints(run)
    msg = str(e.value)
    assert f"column {column!r} = {value!r}" in msg and str(run.resolve()) in msg and str(cache_dir().resolve()) in msg
    b = LatentBrowser(run, progress=False)  # in the widget: a message, nothing read
    assert column in b.message and b.view is None
    with pytest.raises(RunIndexError):
        gallery.load_all(run)
    # an explicitly allowed extra folder is accepted
    if value.startswith(("/etc", "../../etc")):
        target = (run / "sae" / value).resolve() if not value.startswith("/") else Path(value).resolve()
        assert read_hookpoints(run, extra_roots=[target.parent]).loc[0, column] == str(target)


def test_index_paths_inside_the_cache_and_run_are_accepted(tmp_path):
    from revelio_nb.paths import cache_dir

    run = tmp_path / "run"
    (run / "sae").mkdir(parents=True)
    inside = cache_dir("sae") / "x" / "latents"
    _write_index(run, [{**ROW, "sae_dir": str(cache_dir("sae") / "x"), "latents_dir": str(inside),
                        "store_dir": "../features/s"}])
    t = read_hookpoints(run)
    assert t.loc[0, "latents_dir"] == str(inside.resolve())
    assert t.loc[0, "store_dir"] == str((run / "features" / "s").resolve())


def test_browser_cache_writes_do_not_follow_symlinks(tmp_path):
    """The embedding / firing caches are written to a fresh exclusive temporary file and renamed: a symlink planted
    at the cache file's name (or at a predictable temporary name) is replaced or ignored, never written through."""
    folder = tmp_path / "latents"
    folder.mkdir()
    outside = tmp_path / "outside.npz"
    outside.write_bytes(b"precious")
    (folder / "firing.npz").symlink_to(outside)
    import os
    for pid_name in (f".firing.npz.tmp{os.getpid()}.npz", f".firing.npz.tmp{os.getpid()}"):
        (folder / pid_name).symlink_to(tmp_path / f"also-outside-{len(pid_name)}")
    got = browse.embedding.cached_npz(folder, "firing.npz", "k1", lambda: {"a": np.arange(3)})
    assert got["a"].tolist() == [0, 1, 2]
    assert outside.read_bytes() == b"precious" and not list(tmp_path.glob("also-outside-*"))
    assert not (folder / "firing.npz").is_symlink()
    with np.load(folder / "firing.npz") as z:
        assert str(z["key"]) == "k1"


def test_sort_latents_orders_filters_and_puts_missing_last():
    table = pd.DataFrame({"latent": [0, 1, 2, 3, 4], "freq_images": [0.1, 0.5, 0.0, 0.5, 0.2],
                          "purity": [0.9, np.nan, np.nan, 0.3, 0.9], "max_act": [1.0, 3.0, 0.0, 2.0, 5.0],
                          "best_auroc": [0.6, 0.7, np.nan, 0.9, 0.8], "dead": [False, False, True, False, False]})
    assert sort_latents(table, "frequency").tolist() == [1, 3, 4, 0]  # tie 1/3 by id; dead 2 hidden
    assert sort_latents(table, "frequency", hide_dead=False).tolist() == [1, 3, 4, 0, 2]
    assert sort_latents(table, "purity").tolist() == [0, 4, 3, 1]  # NaN purity last
    assert sort_latents(table, "max activation").tolist() == [4, 1, 3, 0]
    assert sort_latents(table, "AUROC", hide_dead=False).tolist() == [3, 4, 1, 0, 2]
    assert sort_latents(table, "index").tolist() == [0, 1, 3, 4]
    with pytest.raises(BrowserError, match="choices"):
        sort_latents(table, "loudness")
    with pytest.raises(BrowserError, match="no 'purity' column"):
        sort_latents(table.drop(columns="purity"), "purity")
    assert "purity" not in browse.available_sorts(table.drop(columns="purity"))


def test_display_image_pads_like_the_model_input():
    img = np.full((28, 28, 1), 200, np.uint8)
    out = browse.display_image(img, 32)
    assert out.shape == (32, 32, 1) and out[:2].max() == 0 and out[2:30, 2:30].min() == 200
    assert browse.display_image(np.zeros((40, 30, 3), np.uint8), 32).shape == (30, 30, 3)  # centre square crop
    out = browse.display_image(np.full((20, 30, 1), 9, np.uint8), 32)  # smaller, not square: padded, not cropped
    assert out.shape == (32, 32, 1) and out[6:26, 1:31].min() == 9 and out.sum() == 9 * 600


# ----------------------------------------------------------------------------------------- the browser
def test_slider_sort_and_filter_select_the_right_latent_and_images(browser):
    b = browser
    b.hookpoint_dd.value = _label(b, spatial=False)
    d = b.data
    st = d.stats
    for sort in browse.available_sorts(d.table):
        for hide in (True, False):
            b.sort_dd.value = sort
            b.dead_cb.value = hide
            order = sort_latents(d.table, sort, hide)
            assert b.order.tolist() == order.tolist() and b.slider.max == len(order) - 1
            b.slider.value = 3
            lat = int(order[3])
            assert b.latent == lat and b.latent_box.value == lat
            keep = st.top_rows[lat, :8] >= 0
            assert b.shown_images == st.top_images[lat, :8][keep].tolist()
            assert b.stats_text.startswith(f"latent #{lat} · rank 4/{len(order)}")
            shown = [s for s in b.slots if s[0].layout.visibility == "visible"]
            assert len(shown) == keep.sum()
            names = [d.class_names[int(x)] for x in st.top_labels[lat, :8][keep]]
            assert all(n in cap.value for (_, _, cap), n in zip(shown, names))
            assert f"{st.top_values[lat, 0]:.3g}" in shown[0][2].value
    # buttons and the latent box
    b.sort_dd.value, b.dead_cb.value = "frequency", True
    b.slider.value = 0
    b.next_btn.click()
    b.next_btn.click()
    b.prev_btn.click()
    assert b.slider.value == 1 and b.latent == int(b.order[1])
    b.prev_btn.click()
    b.prev_btn.click()  # clamped at 0
    assert b.slider.value == 0
    # changing the sort keeps the current latent selected
    cur = b.latent
    b.sort_dd.value = "index"
    assert b.latent == cur and b.order[b.slider.value] == cur
    # jumping to a dead latent un-hides dead latents
    dead = d.table.loc[d.table["dead"], "latent"].tolist()
    assert dead, "the demo SAE should have dead latents"
    b.latent_box.value = dead[0]
    assert b.latent == dead[0] and not b.dead_cb.value and "DEAD" in b.stats_text
    assert b.shown_images == []


def test_heatmap_toggle_and_spatial_hookpoint(browser):
    b = browser
    b.hookpoint_dd.value = _label(b, spatial=False)
    assert b.heatmap_cb.disabled
    b.hookpoint_dd.value = _label(b, spatial=True)
    assert not b.heatmap_cb.disabled and b.data.spatial and b.slider.value == 0
    b.heatmap_cb.value = True
    with_heat = [s[1].value for s in b.slots[:3]]
    b.heatmap_cb.value = False
    plain = [s[1].value for s in b.slots[:3]]
    assert with_heat != plain and all(v[:8] == b"\x89PNG\r\n\x1a\n" for v in plain)
    b.heatmap_cb.value = True
    # the dataset view highlights exactly the images where the latent fires, and its top images
    v = b.view
    fire, _ = b.data.firing_images(v.latent)
    assert sorted(b.data.point_indices[v.firing_points].tolist()) == sorted(fire.tolist())
    assert sorted(b.data.point_indices[v.top_points].tolist()) == sorted(v.images.tolist())
    assert f"the {len(fire)} images where latent #{v.latent} fires" in b.scatter_caption.value


def test_slider_moves_never_touch_the_model_or_the_sae(browser, monkeypatch):
    from revelio_nb import features, models, sae

    def boom(*a, **k):
        raise AssertionError("a slider move ran the model / SAE / feature store")

    b = browser
    b.hookpoint_dd.value = _label(b, spatial=True)  # loaded before the patch (loading may compute caches)
    b.hookpoint_dd.value = _label(b, spatial=False)
    monkeypatch.setattr(sae.SparseAutoencoder, "encode", boom)
    monkeypatch.setattr(sae.SparseAutoencoder, "forward", boom)
    monkeypatch.setattr(features.FeatureStore, "array", boom)
    monkeypatch.setattr(models, "load_model", boom)
    for label in (_label(b, False), _label(b, True)):
        b.hookpoint_dd.value = label
        for _ in range(5):
            b.next_btn.click()
        b.sort_dd.value = "AUROC"
        b.slider.value = b.slider.max
    assert b.message == "" and b.latent is not None


def test_missing_index_is_a_message_in_the_widget(tmp_path):
    b = LatentBrowser(tmp_path / "run", progress=False)
    assert "hookpoints.csv" in b.message and "notebook 02" in b.message
    assert b.view is None and b.slider.disabled and b.content.layout.display == "none"
    assert "hookpoints.csv" in repr(b) and "hookpoints.csv" in b.snapshot_html()
    b.next_btn.click()  # nothing happens, nothing raises
    bundle = b._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/html" in bundle


def test_missing_empty_or_all_dead_tables_are_messages(demo, tmp_path):
    run = tmp_path / "run"  # the tables live in the run folder (the browser reads nothing outside it and the cache)
    good = read_hookpoints(demo)
    rows = [good.iloc[0].to_dict()]
    missing = {**rows[0], "hookpoint": "missing", "latents_dir": str(run / "nowhere")}
    empty_dir = run / "empty"
    LatentStats(table=pd.DataFrame(columns=["latent", "freq_tokens", "freq_images"]),
                top_rows=np.zeros((0, 4), np.int64), top_values=np.zeros((0, 4), np.float32),
                top_images=np.zeros((0, 4), np.int64)).save(empty_dir)
    empty = {**rows[0], "hookpoint": "empty", "latents_dir": str(empty_dir)}
    broken_dir = run / "broken"
    broken_dir.mkdir(parents=True)
    (broken_dir / "latents.csv").write_text("")
    broken = {**rows[0], "hookpoint": "broken", "latents_dir": str(broken_dir)}
    dead_dir = run / "dead"
    dead_stats = LatentStats.load(rows[0]["latents_dir"])
    dead_stats.table["freq_tokens"] = 0.0
    dead_stats.save(dead_dir)
    dead = {**rows[0], "hookpoint": "all dead", "latents_dir": str(dead_dir)}
    _write_index(run, [missing, empty, broken, dead, rows[0]])
    b = LatentBrowser(run, top_n=4, progress=False)
    assert "missing" in b.message and "no latent statistics" in b.message and b.view is None
    b.hookpoint_dd.value = "empty"
    assert "empty (0 latents)" in b.message and b.view is None
    b.hookpoint_dd.value = "broken"
    assert "not committed" in b.message
    b.hookpoint_dd.value = "all dead"
    assert "all" in b.message and "dead" in b.message and "untick" in b.message and b.view is None
    b.dead_cb.value = False
    assert b.message == "" and b.view is not None
    b.hookpoint_dd.value = rows[0]["hookpoint"]
    assert b.message == "" and b.stats_text.startswith("latent #")
    with pytest.raises(BrowserError, match="unknown hookpoint 'nope'; choices"):
        LatentBrowser(run, hookpoint="nope", progress=False)
    with pytest.raises(BrowserError, match="unknown sort"):
        LatentBrowser(run, sort="loudness", progress=False)


# ----------------------------------------------------------------------------------------- precomputation
def test_firing_index_matches_the_sparse_code(demo):
    from revelio_nb.features import FeatureStore
    from revelio_nb.sae import SparseAutoencoder

    row = read_hookpoints(demo).iloc[0].to_dict()
    d = browse.load_hookpoint(row, progress=False)
    store = FeatureStore.open(row["store_dir"])
    x = torch.from_numpy(np.array(store.array(row["block"], row["t"]), dtype=np.float32))
    with torch.no_grad():
        acts, idx = SparseAutoencoder.load(row["sae_dir"]).encode(x)
    for lat in range(0, d.num_latents, 7):
        fired = ((idx == lat) & (acts > 0)).any(1).numpy()
        imgs, scores = d.firing_images(lat)
        assert sorted(imgs.tolist()) == sorted(store.indices[fired].tolist())
        assert np.all(np.diff(scores) <= 0)
        n = int((d.stats.top_rows[lat] >= 0).sum())  # the stats' top images are the best-scoring firing images
        np.testing.assert_allclose(scores[:n], d.stats.top_values[lat, :n], rtol=1e-5)
        assert int(d.table.loc[lat, "freq_images"] * len(store) + 0.5) == len(imgs)


def _reencoded_firing(row: dict):
    """The firing index as the browser built it before it read the statistics' firing lists: encode the whole
    store again, an image's score its activation (max over positions), sorted by latent then score."""
    from revelio_nb.features import FeatureStore
    from revelio_nb.sae import ArraySource, SparseAutoencoder

    store = FeatureStore.open(row["store_dir"])
    src = ArraySource(store.array(row["block"], int(row["t"])))
    model = SparseAutoencoder.load(row["sae_dir"])
    m, hw = model.num_latents, src.positions
    tokens = np.arange(len(src.rows) * hw)
    with torch.no_grad():
        acts, idx = model.encode(torch.from_numpy(src.gather(tokens)))
    dense = torch.zeros(len(tokens), m).scatter(1, idx, acts.float()).numpy().reshape(len(src.rows), hw, m).max(1)
    img, lat = np.nonzero(dense > 0)
    val = dense[img, lat]
    order = np.lexsort((img, -val, lat))
    return np.searchsorted(lat[order], np.arange(m + 1)), store.indices[img[order]], val[order]


def test_browser_reads_the_firing_lists_of_the_stats_pass_and_shows_what_it_showed_before(demo, monkeypatch):
    """No second encoding pass: the hookpoint loads with the SAE's encoder disabled, and every latent's firing
    images (solid points of the dataset view) and their order equal the old re-encoding firing index."""
    from revelio_nb.sae import SparseAutoencoder

    rows = read_hookpoints(demo).to_dict("records")
    expected = [_reencoded_firing(r) for r in rows]

    def no_encoding(*a, **k):
        raise AssertionError("the browser encoded the store again")

    monkeypatch.setattr(SparseAutoencoder, "encode", no_encoding)
    assert {r["pooling"] for r in rows} == {"mean", "map"}
    for row, (ptr, images, scores) in zip(rows, expected):
        d = browse.load_hookpoint(row, progress=False)
        np.testing.assert_array_equal(d.firing.ptr, ptr)
        np.testing.assert_array_equal(d.firing.images, images)
        np.testing.assert_allclose(d.firing.scores, scores, rtol=1e-5)
        for lat in range(d.num_latents):
            v = browse.latent_view(d, lat, top_n=8)
            assert v.n_firing == ptr[lat + 1] - ptr[lat]
            np.testing.assert_array_equal(v.firing_points, d.points_of(images[ptr[lat]:ptr[lat + 1]]))


def test_embedding_and_firing_caches_are_reused(demo):
    row = read_hookpoints(demo).iloc[1].to_dict()
    browse.load_hookpoint(row, progress=False)
    files = [Path(row["latents_dir"]) / n for n in ("embedding-pca.npz", "firing.npz")]  # firing: the stats' part
    stamps = [f.stat().st_mtime_ns for f in files]
    d = browse.load_hookpoint(row, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert d.points.shape == (len(d.point_indices), 2) and np.isfinite(d.points).all()
    assert d.points_of(d.point_indices[::-1]).tolist() == list(range(len(d.points)))[::-1]


# ------------------------------------------------------------------------------------------ static output
def _payload(page: Path) -> dict:
    text = page.read_text()
    return json.loads(re.search(r'<script type="application/json" id="revelio-data">(.*?)</script>', text, re.S).group(1))


def test_png_gallery_and_standalone_page(demo, tmp_path):
    data, problems = gallery.load_all(demo, progress=False)
    assert not problems and len(data) == 3
    paths, table = gallery.save_png_gallery(data, tmp_path, n_latents=3, n_images=4, sort="AUROC")
    assert len(paths) == 3 and all(p.is_file() and p.stat().st_size > 5000 for p in paths)
    assert (tmp_path / "tables" / "03_gallery_latents.csv").is_file() and len(table) == 9
    first = table[table.hookpoint == data[0].label]
    assert first["latent"].tolist() == gallery.gallery_latents(data[0], 3, "AUROC").tolist()
    summary = gallery.summarize_hookpoints(data)
    assert summary["latents"].tolist() == [d.num_latents for d in data]

    page = browse.page.write_html(data, tmp_path / "browser" / "latents.html", top_n=4)
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "the page must not load anything remote"
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    p = _payload(page)
    assert [h["label"] for h in p["hookpoints"]] == [d.label for d in data]
    for h, d in zip(p["hookpoints"], data):
        vals = np.frombuffer(base64.b64decode(h["top_values"]), "<f4").reshape(d.num_latents, 4)
        np.testing.assert_allclose(vals, d.stats.top_values[:, :4])
        assert h["table"]["latent"] == list(range(d.num_latents))
        assert h["spatial"] == d.spatial and (h["maps"] is not None) == d.spatial
        ptr = np.frombuffer(base64.b64decode(h["firing_ptr"]), "<i4")
        assert ptr[-1] == sum(min(len(d.firing_images(m)[0]), 1000) for m in range(d.num_latents))
    assert browse.page.write_static_browser(tmp_path / "nothing") is None


def test_row_dataset_must_be_the_one_its_store_was_extracted_from(demo):
    """Another dataset name in the index would show other images (and could point the browser at any image
    folder): refused by name."""
    row = read_hookpoints(demo).iloc[0].to_dict()
    assert row["dataset"] == "animal-mnist"
    with pytest.raises(BrowserError, match="dataset 'digits' is not the one its store .* extracted from "
                                           "\\('animal-mnist'\\)"):
        browse.load_hookpoint({**row, "dataset": "digits"}, progress=False)
