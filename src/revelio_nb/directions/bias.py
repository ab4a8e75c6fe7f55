"""Bias: neutral prompts read on attribute axes, Spearman rho against the ground truth, and checks.

:func:`bias_scores` (prompt-pair axes, the paper's) and :func:`caption_axis_bias` (caption-map word axes along the
trajectory, from :func:`caption_axis_projections` and :func:`combine_steps`) score each class; rho against the
truth by :func:`compare_with_ground_truth`, per step by :func:`stepwise_rho`, and on independent seed sets with
bootstrap intervals over the paired seeds by :func:`bootstrap_rho` / :func:`rho_by_seed_set`. References and
checks: :func:`caption_retrieval` (real images retrieve their class's prompt h), :func:`generated_attribute_scores`
and :func:`prompt_following` (the attribute measured on what the prompts draw), :func:`cluster_prompts`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..captions import ATTRIBUTES, attribute_prompt, neutral_prompt
from ..pooling import FLAT, H_FORMS, MEAN, check_pooling
from .axes import attribute_axis, mirror_axis, word_axis
from .prompt_runs import PromptH
from .word_maps import WordMap, unit


SCORE_METHODS = ("axis", "pair")


CENTRES = ("class", "global")


def bias_scores(lat: PromptH, nouns: Sequence[str], attributes: Sequence[str] | None = None,
                form: str = MEAN, method: str = "axis", centre: str = "global",
                axes: dict[str, np.ndarray] | None = None, template: str | None = None) -> pd.DataFrame:
    """How much each neutral prompt leans to the high word of each attribute.

    ``method="axis"`` (the paper's): projection of the neutral h on the unit attribute axis, by default
    the prompt-pair axis averaged over nouns (:func:`attribute_axis`), or ``axes[attribute]`` when given (e.g.
    :func:`word_axis` from the caption map). ``centre``: "global" (the paper's) subtracts the reference mean of
    the prompt h; "class" subtracts the mean of the noun's own prompts (neutral + its attribute prompts present),
    so a noun's identity offset, which has nothing to do with the attribute, cannot leak into the projection.
    ``method="pair"``: where the neutral h of a noun falls between its own low and high prompts,
    <h_n - h_low, h_high - h_low> / |h_high - h_low|^2 (0 = like the low prompt, 1 = like the high).
    One row per (noun, attribute) with ``score``; ranks within an attribute in ``rank`` (1 = most "high").
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(SCORE_METHODS)}")
    if centre not in CENTRES:
        raise ValueError(f"unknown centre {centre!r}; valid: {list(CENTRES)}")
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    kw = {} if template is None else {"template": template}
    refs = {}
    if method == "axis" and centre == "class":
        for noun in nouns:
            own = [neutral_prompt(noun, **kw)] + [attribute_prompt(noun, a, w, **kw) for a in attributes
                                                  for w in ATTRIBUTES[a].words]
            present = [p for p in own if p in lat]
            if present:  # (a noun with no prompt at all fails below with the missing neutral prompt)
                refs[noun] = lat.get(present, form).mean(0)
    rows = []
    for attr in attributes:
        a = ATTRIBUTES[attr]
        axis = None
        if method == "axis":
            axis = unit(axes[attr]) if axes is not None else attribute_axis(lat, nouns, attr, form, template=template)
        for noun in nouns:
            h = lat.get(neutral_prompt(noun, **kw), form)
            if method == "axis":
                score = float((h - refs[noun]) @ axis) if centre == "class" else float(h @ axis)
            else:
                hi = lat.get(attribute_prompt(noun, attr, a.high, **kw), form)
                lo = lat.get(attribute_prompt(noun, attr, a.low, **kw), form)
                d = hi - lo
                score = float((h - lo) @ d / max(float(d @ d), 1e-12))
            rows.append({"class": noun, "attribute": attr, "high": a.high, "low": a.low, "score": score})
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby("attribute")["score"].rank(ascending=False, method="min").astype(int)
    return df


def _neutral_indices(lat: PromptH, nouns: Sequence[str], template: str | None) -> np.ndarray:
    kw = {} if template is None else {"template": template}
    return lat.indices([neutral_prompt(n, **kw) for n in nouns])


def _step_axes(lat: PromptH, word_maps: dict[int, "WordMap"], attributes: list[str], method: str) -> list:
    if not word_maps:
        raise ValueError("no word maps given: pass {capture step: WordMap}")
    missing = [s for s in word_maps if not lat.capture_steps or s not in lat.capture_steps]
    if missing:
        raise ValueError(f"steps {missing} were not captured; capture_steps: {lat.capture_steps}")
    return [np.stack([word_axis(wm, a, method) for a in attributes]) for wm in word_maps.values()]


def _pool(h: np.ndarray, lat: PromptH, form: str) -> np.ndarray:
    """Flat h (..., C*h*w) -> the requested form (MEAN: mean over space)."""
    if check_pooling(form, H_FORMS, "form") == FLAT:
        return h
    if lat.shape is None:
        raise ValueError("pooled projections of flat h need the block's output shape (lat.shape)")
    return h.reshape(*h.shape[:-1], lat.shape[0], -1).mean(-1)


def caption_axis_projections(lat: PromptH, word_maps: dict[int, "WordMap"], nouns: Sequence[str],
                             attributes: Sequence[str] | None = None, form: str = FLAT, method: str = "mean_diff",
                             template: str | None = None, per_seed: bool = False, mirror: bool = False) -> np.ndarray:
    """Neutral prompts' h projected on each step's caption-map word axes (high word - low word, :func:`word_axis`).

    Returns (nouns, steps, attributes) from the seed-mean h, or with ``per_seed`` (needs ``flat_seeds``, i.e.
    ``prompt_h(keep_seeds=True)``) every seed's projection, (nouns, seeds, steps, attributes); projection is
    linear, so the mean over seeds of the latter is the former. Steps are in ``word_maps`` order. With ``mirror``
    (flat form) each axis keeps only its part of the attribute's mirror parity (:func:`mirror_axis`,
    :attr:`revelio_nb.captions.Attribute.mirror`).
    """
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    axes = _step_axes(lat, word_maps, attributes, method)
    if mirror and form == FLAT:
        if lat.shape is None or len(lat.shape) != 3:
            raise ValueError(f"mirror needs spatial h (C, h, w); these have shape {lat.shape}")
        axes = [np.stack([mirror_axis(ax[j], lat.shape, ATTRIBUTES[a].mirror) for j, a in enumerate(attributes)])
                for ax in axes]
    idx = _neutral_indices(lat, nouns, template)
    out = []
    for step, ax in zip(word_maps, axes):
        k = lat.capture_steps.index(step)
        if per_seed:
            if lat.flat_seeds is None:
                raise ValueError(f"these prompt h ({lat.source}) kept no per-seed h: compute them with keep_seeds=True")
            h = _pool(lat.flat_seeds[idx, :, k].astype(np.float32), lat, form)  # (N, S, d)
        else:
            h = lat.at_step(step).get(form=form)[idx]  # (N, d)
        out.append(h.astype(np.float64) @ ax.T.astype(np.float64))
    return np.stack(out, axis=-2)


def combine_steps(projections: np.ndarray) -> np.ndarray:
    """(..., nouns, steps, attributes) projections -> (..., nouns, attributes) scores: standardised across nouns
    for each (step, attribute), then averaged over the steps (so each step weighs the same whatever its scale)."""
    p = np.asarray(projections, dtype=np.float64)
    sd = p.std(-3, keepdims=True)
    return ((p - p.mean(-3, keepdims=True)) / np.where(sd > 0, sd, 1.0)).mean(-2)


def scores_frame(scores: np.ndarray, nouns: Sequence[str], attributes: Sequence[str]) -> pd.DataFrame:
    """A (nouns, attributes) score matrix in the layout of :func:`bias_scores` (class, attribute, high, low,
    score, rank)."""
    rows = [{"class": n, "attribute": a, "high": ATTRIBUTES[a].high, "low": ATTRIBUTES[a].low,
             "score": float(scores[i, j])} for j, a in enumerate(attributes) for i, n in enumerate(nouns)]
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby("attribute")["score"].rank(ascending=False, method="min").astype(int)
    return df


def caption_axis_bias(lat: PromptH, word_maps: dict[int, "WordMap"], nouns: Sequence[str],
                      attributes: Sequence[str] | None = None, form: str = FLAT, method: str = "mean_diff",
                      template: str | None = None, seeds: np.ndarray | None = None, mirror: bool = False
                      ) -> pd.DataFrame:
    """Bias read along the sampling trajectory with axes named by caption words (METHODS.md §2 steps 3-4).

    ``word_maps`` maps a capture step of ``lat`` to a :class:`WordMap` fitted on real captioned images noised to
    that step's timestep (:func:`step_index` gives the step of a timestep). At each step the neutral prompts'
    h is projected on the attribute's word axis (high word - low word, :func:`word_axis`); the scores are
    standardised across nouns per (step, attribute) and averaged over the steps (:func:`combine_steps`). Same
    layout as :func:`bias_scores` (one row per noun and attribute, ``score``, ``rank``). ``seeds`` (indices
    into the seeds, needs ``keep_seeds``) reads the score from a subset of the seeds only; ``method`` and
    ``mirror`` choose the axes (:func:`caption_axis_projections`).
    """
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    if seeds is None:
        proj = caption_axis_projections(lat, word_maps, nouns, attributes, form, method, template, mirror=mirror)
    else:
        proj = caption_axis_projections(lat, word_maps, nouns, attributes, form, method, template, per_seed=True,
                                        mirror=mirror)[:, np.asarray(seeds)].mean(1)
    return scores_frame(combine_steps(proj), nouns, attributes)


def _rank_corr(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman rho of each row of ``scores`` (..., N) with ``truth`` (N,) (average ranks for ties)."""
    from scipy.stats import rankdata

    rs = rankdata(scores, axis=-1)
    rt = rankdata(truth)
    rs = rs - rs.mean(-1, keepdims=True)
    rt = rt - rt.mean()
    den = np.sqrt((rs ** 2).sum(-1) * (rt ** 2).sum())
    return np.where(den > 0, (rs * rt).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_rho(projections: np.ndarray, truth: np.ndarray, n_boot: int = 1000, ci: float = 0.9,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Spearman rho of the combined score against the truth, with a bootstrap interval over seeds.

    ``projections`` (nouns, seeds, steps, attributes) from :func:`caption_axis_projections` (``per_seed``);
    ``truth`` (nouns, attributes) (NaN = unknown: that noun is left out of that attribute's rho). The seeds
    are resampled with replacement ``n_boot`` times, the same seed indices for every noun (the seeds are paired:
    every prompt starts from the same noises), and the percentile interval of the resampled rho is returned.
    Returns {"rho", "ci_low", "ci_high", "boot_sd"} as (attributes,) arrays.
    """
    proj = np.asarray(projections, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if proj.ndim != 4:
        raise ValueError(f"projections must be (nouns, seeds, steps, attributes), got shape {proj.shape}")
    n, s, _, a = proj.shape
    if truth.shape != (n, a):
        raise ValueError(f"truth must be (nouns, attributes) = {(n, a)}, got {truth.shape}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot <= 0:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    point = combine_steps(proj.mean(1))  # (N, A)
    rng = np.random.default_rng(seed)
    boots = []
    chunk = max(1, 2_000_000 // max(1, n * s * proj.shape[2] * a))
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, s, (min(chunk, n_boot - start), s))
        boots.append(combine_steps(np.moveaxis(proj[:, idx].mean(2), 0, 1)))  # (b, N, K, A) -> (b, N, A)
    boot = np.concatenate(boots)
    out = {k: np.full(a, np.nan) for k in ("rho", "ci_low", "ci_high", "boot_sd")}
    q = (1 - ci) / 2
    for j in range(a):
        ok = np.isfinite(truth[:, j])
        if ok.sum() < 3 or np.ptp(truth[ok, j]) == 0:
            continue
        out["rho"][j] = float(_rank_corr(point[ok, j], truth[ok, j]))
        r = _rank_corr(boot[:, ok, j], truth[ok, j])
        r = r[np.isfinite(r)]
        if len(r):
            out["ci_low"][j], out["ci_high"][j] = np.quantile(r, [q, 1 - q])
            out["boot_sd"][j] = r.std(ddof=1) if len(r) > 1 else 0.0
    return out


def truth_matrix(truth: pd.DataFrame, nouns: Sequence[str], attributes: Sequence[str],
                 truth_column: str = "rate") -> np.ndarray:
    """Ground truth (class, attribute, ``truth_column`` rows) as a (nouns, attributes) array (NaN where missing)."""
    t = truth.pivot_table(index="class", columns="attribute", values=truth_column, aggfunc="first")
    return t.reindex(index=list(nouns), columns=list(attributes)).to_numpy(dtype=np.float64)


def rho_by_seed_set(projections: dict[str, np.ndarray], nouns: Sequence[str], truth: pd.DataFrame,
                    attributes: Sequence[str], truth_column: str = "rate", n_boot: int = 1000, ci: float = 0.9,
                    seed: int = 0, pooled: str | None = "all seed sets") -> pd.DataFrame:
    """rho against the truth for each independent seed set, each with its bootstrap interval over seeds.

    ``projections`` maps a seed-set label to its (nouns, seeds, steps, attributes) projections. With ``pooled``
    (a label) one more row per attribute reads all seed sets at once (their seeds concatenated). One row per
    (seed_set, attribute): rho, ci_low, ci_high, boot_sd, n_seeds, ci (the level).
    """
    if not projections:
        raise ValueError("no seed sets given")
    attributes = list(attributes)
    tm = truth_matrix(truth, nouns, attributes, truth_column)
    sets = dict(projections)
    if pooled and len(sets) > 1:
        sets[pooled] = np.concatenate(list(projections.values()), axis=1)
    rows = []
    for label, proj in sets.items():
        r = bootstrap_rho(proj, tm, n_boot=n_boot, ci=ci, seed=seed)
        for j, a in enumerate(attributes):
            rows.append({"seed_set": str(label), "attribute": a, "rho": r["rho"][j], "ci_low": r["ci_low"][j],
                         "ci_high": r["ci_high"][j], "boot_sd": r["boot_sd"][j], "n_seeds": int(proj.shape[1]),
                         "ci": ci})
    return pd.DataFrame(rows)


def score_table(scores: pd.DataFrame, column: str = "score") -> pd.DataFrame:
    """Scores as a class x attribute matrix (rows/columns in first-seen order)."""
    return scores.pivot(index="class", columns="attribute", values=column).loc[
        list(dict.fromkeys(scores["class"])), list(dict.fromkeys(scores["attribute"]))]


def compare_with_ground_truth(scores: pd.DataFrame, truth: pd.DataFrame, truth_column: str = "rate",
                              label: str = "") -> pd.DataFrame:
    """Spearman rho across classes between each attribute's bias score and its ground-truth rate.

    ``truth`` has columns class, attribute and ``truth_column`` (e.g. :func:`revelio_nb.captions.ground_truth`).
    Rows with a missing truth are dropped; rho is NaN when fewer than 3 classes remain or a side is constant.
    """
    from scipy.stats import spearmanr

    merged = scores.merge(truth[["class", "attribute", truth_column]], on=["class", "attribute"], how="inner")
    if merged.empty:
        raise ValueError("no (class, attribute) pair is shared by the scores and the ground truth: check class names")
    rows = []
    for attr, g in merged.groupby("attribute", sort=False):
        g = g.dropna(subset=["score", truth_column])
        ok = len(g) >= 3 and g["score"].nunique() > 1 and g[truth_column].nunique() > 1
        rho, p = spearmanr(g["score"], g[truth_column]) if ok else (np.nan, np.nan)
        rows.append({"attribute": attr, "rho": float(rho), "p_value": float(p), "n_classes": len(g),
                     "truth_range": float(g[truth_column].max() - g[truth_column].min()) if len(g) else np.nan,
                     **({"scores": label} if label else {})})
    return pd.DataFrame(rows)


def stepwise_rho(lat: PromptH, nouns: Sequence[str], truth: pd.DataFrame,
                 attributes: Sequence[str] | None = None, centre: str = "global") -> pd.DataFrame:
    """Spearman rho vs ground truth of the bias score computed from each denoising step's pooled h alone.

    Shows *when* during sampling h carries each attribute (e.g. the silhouette's size early, texture late).
    One row per (step, attribute); a step where every prompt has the same h (the first step of the neutral
    pass: same x_T, same condition) gives NaN.
    """
    if lat.pooled_steps is None:
        raise ValueError(f"these prompt h ({lat.source}) keep no per-step h (pooled_steps); use prompt_h()")
    rows = []
    for step in range(lat.pooled_steps.shape[1]):
        one = PromptH(lat.prompts, lat.pooled_steps[:, step], None, shape=lat.shape)
        scores = bias_scores(one, nouns, attributes, form=MEAN, centre=centre)
        rows.append(compare_with_ground_truth(scores, truth).assign(step=step))
    return pd.concat(rows, ignore_index=True)


def cluster_prompts(lat: PromptH, prompts: Sequence[str] | None = None, form: str = MEAN,
                    metric: str = "cosine", method: str = "average") -> dict[str, Any]:
    """Hierarchical clustering of prompt h (scipy linkage); returns {"linkage", "labels", "order"}."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    prompts = list(lat.prompts if prompts is None else prompts)
    if len(prompts) < 2:
        raise ValueError("clustering needs at least two prompts")
    x = lat.get(prompts, form).astype(np.float64)
    z = linkage(x, method=method, metric=metric)
    return {"linkage": z, "labels": prompts, "order": [prompts[i] for i in leaves_list(z)]}


def caption_retrieval(lat: PromptH, image_h: dict[int, np.ndarray], labels: np.ndarray,
                      nouns: Sequence[str], steps: dict[int, int], form: str = FLAT, k: Sequence[int] = (1, 5),
                      template: str | None = None) -> pd.DataFrame:
    """Image-conditioning check of the prompt h: does h of a real captioned image, noised to t, sit
    closest to its own class's prompt h among the other classes'?

    ``image_h`` maps a timestep t to h of real images noised to t ((M, d), same block, pass and ``form`` as
    ``lat``; e.g. a feature store with neutral conditioning), ``labels`` gives each image's class as an index into
    ``nouns``, ``steps`` maps t to the capture step of ``lat`` read for it (:func:`step_index`). Both sides are
    centred on their own mean (images on the images', prompt h on the classes'), so a constant offset
    between real and generated h does not decide; similarity = cosine. One row per t: top-k accuracy for each k
    (share of images whose own class ranks within the k most similar prompt h) beside chance (k / classes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    nouns = list(nouns)
    if labels.size and (labels.min() < 0 or labels.max() >= len(nouns)):
        raise ValueError(f"labels must index the {len(nouns)} nouns, got values {labels.min()}..{labels.max()}")
    missing = [t for t in image_h if t not in steps]
    if missing:
        raise ValueError(f"timesteps {missing} have no capture step in steps={steps}")
    idx = _neutral_indices(lat, nouns, template)
    rows = []
    for t, h in image_h.items():
        h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
        if len(h) != len(labels):
            raise ValueError(f"{len(h)} image rows at t={t} for {len(labels)} labels")
        protos = lat.at_step(steps[t]).raw(form)[idx].astype(np.float64)
        if protos.shape[1] != h.shape[1]:
            raise ValueError(f"image h has {h.shape[1]} dims at t={t}, the prompt h ({form}) {protos.shape[1]}")
        sim = unit(h - h.mean(0)) @ unit(protos - protos.mean(0)).T  # (M, classes)
        own = sim[np.arange(len(h)), labels][:, None]
        above = (sim > own + 1e-12).sum(1)  # classes clearly more similar than the own one
        tied = (np.abs(sim - own) <= 1e-12).sum(1)  # the own class and any class exactly as similar
        row = {"t": int(t), "step": int(steps[t]), "n_images": len(h), "n_classes": len(nouns)}
        for kk in k:  # ties broken at random: the chance that the own class lands within the top k
            row[f"top{kk}"] = float(np.clip((kk - above) / tied, 0.0, 1.0).mean())
            row[f"chance_top{kk}"] = min(1.0, kk / len(nouns))
        rows.append(row)
    return pd.DataFrame(rows)


def generated_attribute_scores(lat: PromptH, nouns: Sequence[str], attributes: Sequence[str] | None = None,
                               thresholds: dict[str, tuple[float, float]] | None = None,
                               template: str | None = None) -> pd.DataFrame:
    """What the model actually draws for each noun's neutral prompt (needs ``keep_images``), in the
    (class, attribute, score) layout of :func:`bias_scores`.

    ``score`` is the mean measured value; with the captions' ``thresholds`` (low, high) it is instead the caption
    rule applied to the generated images: n_high / (n_high + n_low), directly comparable to the ground-truth rate.
    """
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    kw = {} if template is None else {"template": template}
    rows = []
    for noun in nouns:
        imgs = lat.images_of(neutral_prompt(noun, **kw))
        for a in attributes:
            v = ATTRIBUTES[a].measure(imgs)
            if thresholds is not None:
                lo, hi = thresholds[a]
                nh, nl = int((v > hi).sum()), int((v < lo).sum())
                score = nh / (nh + nl) if nh + nl else float("nan")
            else:
                score = float(v.mean())
            rows.append({"class": noun, "attribute": a, "high": ATTRIBUTES[a].high, "low": ATTRIBUTES[a].low,
                         "score": score})
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby("attribute")["score"].rank(ascending=False, method="min")
    return df


def prompt_following(lat: PromptH, nouns: Sequence[str], attributes: Sequence[str] | None = None,
                     template: str | None = None) -> pd.DataFrame:
    """Does the model draw what the attribute words say? The attribute measured on the images generated from
    the high-word, neutral and low-word prompts of every noun (needs ``keep_images``), with the standardised
    difference d = (mean_high - mean_low) / pooled std. An attribute the model does not follow (d near 0) gives
    a prompt-pair axis made of noise."""
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    kw = {} if template is None else {"template": template}
    rows = []
    for attr in attributes:
        a = ATTRIBUTES[attr]
        vals = {}
        groups = {"high": [attribute_prompt(n, attr, a.high, **kw) for n in nouns],
                  "neutral": [neutral_prompt(n, **kw) for n in nouns],
                  "low": [attribute_prompt(n, attr, a.low, **kw) for n in nouns]}
        for key, prompts in groups.items():
            vals[key] = a.measure(lat.images_of(prompts))
        sd = np.sqrt((vals["high"].var(ddof=1) + vals["low"].var(ddof=1)) / 2)
        rows.append({"attribute": attr, "high": a.high, "low": a.low, "mean_high": float(vals["high"].mean()),
                     "mean_neutral": float(vals["neutral"].mean()), "mean_low": float(vals["low"].mean()),
                     "d": float((vals["high"].mean() - vals["low"].mean()) / sd) if sd > 0 else float("nan")})
    return pd.DataFrame(rows)
