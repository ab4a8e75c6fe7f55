"""Notebook 06's bias study in one call: does the model's default association hold on every seed set?

:func:`bias_study` runs METHODS.md §2 steps 3-4 end to end on a text-conditioned model and its captioned data:

1. **Ground truth**: captions measured on the images (:mod:`revelio_nb.captions`), and the rate of each
   attribute's high word per class in the training split.
2. **Caption maps**: real training images noised to each t of ``t_maps``, h captured with neutral conditioning
   (a feature store), and caption words tied to h (:func:`~revelio_nb.directions.fit_word_map`); each attribute's
   axis is its high word minus its low word.
3. **Neutral prompts** ("a drawing of a cat") sampled on ``seed_sets`` *independent* sets of ``n_seeds`` paired
   seeds (set r starts from seed ``seed + 1000 r``); h is read from a neutral pass at the steps matching
   ``t_maps`` and every seed's h is kept.
4. **Scores and rho**: each seed's h projected on the word axes, averaged over the seeds, standardised across
   classes per step and averaged over the steps (:func:`~revelio_nb.directions.caption_axis_bias`); Spearman rho
   against the truth for each seed set and for all sets at once, each with a bootstrap interval over its seeds
   (:func:`~revelio_nb.directions.rho_by_seed_set`).
5. **References**: the text encoder's own embeddings on the paper's prompt-pair axes (what the diffusion model
   adds), the attribute measured on the images the neutral prompts drew, and the image-conditioning check
   (:func:`~revelio_nb.directions.caption_retrieval`: real test images noised to t retrieve their class's prompt
   latent).

:func:`summary_table` turns one or more studies (e.g. two training seeds of the text model, later other samplers)
plus steering results into notebook 06's summary: one row per (model, sampler, attribute).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import captions as C
from ..models import DiffusionModel
from ..pooling import FLAT, H_FORMS, MAP, MEAN, check_pooling
from .axes import attribute_prompts
from .bias import (bias_scores, caption_axis_bias, caption_axis_projections, caption_retrieval, combine_steps,
                   compare_with_ground_truth, generated_attribute_scores, rho_by_seed_set, scores_frame)
from .prompt_runs import PromptH, SampleConfig, prompt_h, step_index, text_encoder_embeddings
from .word_maps import WORD_METHODS, WordMap, fit_word_map


@dataclass
class BiasStudyConfig:
    """Sizes and choices of :func:`bias_study` (defaults: notebook 06's full profile)."""

    attributes: list[str] = field(default_factory=lambda: list(C.ATTRIBUTES))
    n_seeds: int = 256  # paired seeds per neutral prompt in each seed set (128: one set of seed 0 dips below 0.8)
    seed_sets: int = 3  # independent seed sets (set r: seeds drawn from seed + 1000 r)
    seed: int = 0
    steps: int = 10  # DDIM steps
    guidance_scale: float = 1.0
    t_maps: list[int] = field(default_factory=lambda: [0])  # caption maps; the score reads h at these t
    form: str = FLAT  # "flat" (C*h*w: where things are) or "mean" (C), :mod:`revelio_nb.pooling`
    axis_method: str = "whitened"  # word axes: "whitened" (shrinkage LDA), "mean_diff" or "ridge" (fit_word_map)
    shrinkage: float = 10.0  # of the whitened axes (x the mean variance per dimension of h)
    mirror: bool = True  # flat axes keep only their attribute's mirror parity (facing antisymmetric, others symmetric)
    map_max_images: int = 3000  # training images behind the caption maps
    retrieval_ts: list[int] = field(default_factory=lambda: [0, 100, 300])  # image-conditioning check (every
    # seed set captures the neutral pass at these steps too)
    retrieval_max_images: int = 500  # test images for the check (0: skip it)
    n_boot: int = 1000  # bootstrap resamples of the seeds
    ci: float = 0.9  # bootstrap interval level
    batch_size: int = 64
    sampler: str = "DDIM"  # label of the sampling path in the tables
    label: str = ""  # label of the model in the tables (default: its id)

    def validate(self) -> "BiasStudyConfig":
        self.attributes = C._check_attributes(self.attributes)
        for name in ("n_seeds", "seed_sets", "steps", "map_max_images", "n_boot", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.retrieval_max_images < 0:
            raise ValueError(f"retrieval_max_images must be >= 0, got {self.retrieval_max_images}")
        if not self.t_maps:
            raise ValueError("t_maps is empty: give at least one timestep, e.g. [0, 100]")
        check_pooling(self.form, H_FORMS, "form")
        if self.axis_method not in WORD_METHODS:
            raise ValueError(f"axis_method {self.axis_method!r} is not one of {list(WORD_METHODS)}")
        if not self.shrinkage > 0:
            raise ValueError(f"shrinkage must be > 0, got {self.shrinkage}")
        if not 0 < self.ci < 1:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}")
        return self

    def seed_of(self, r: int) -> int:
        """First seed of seed set ``r``."""
        return self.seed + 1000 * r


@dataclass
class BiasStudy:
    """What :func:`bias_study` found (tables are pandas DataFrames, one row per (seed set, attribute) etc.)."""

    config: BiasStudyConfig
    model_id: str
    nouns: list[str]
    truth: pd.DataFrame  # captions.ground_truth rows of the studied attributes (training split)
    caption_set: C.CaptionSet
    store: Any  # feature store behind the caption maps (training images, t_maps, pooling "map")
    word_maps: dict[int, WordMap]  # capture step -> caption map at that step's timestep
    map_steps: dict[int, int]  # t -> capture step (one t per step when several t_maps fall on one step)
    neutral_h: dict[str, PromptH]  # seed-set label -> neutral prompts' h (neutral pass)
    projections: dict[str, np.ndarray]  # seed-set label -> (nouns, seeds, steps, attributes)
    scores: dict[str, pd.DataFrame]  # seed-set label (and "all seed sets") -> bias scores
    rho: pd.DataFrame  # rho_by_seed_set: per seed set and all sets, with bootstrap intervals
    references: pd.DataFrame  # rho of the reference scores (text encoder, generated images) per seed set
    text_encoder_scores: pd.DataFrame
    retrieval: pd.DataFrame | None  # caption_retrieval per (seed set, t) (None when skipped)

    @property
    def label(self) -> str:
        return self.config.label or self.model_id

    @property
    def seed_set_labels(self) -> list[str]:
        return list(self.neutral_h)

    @property
    def map_captions(self) -> list[str]:
        """The caption of every row of :attr:`store` (the images behind the caption maps)."""
        return [self.caption_set.captions[i] for i in self.store.indices]

    def map_h(self, t: int, form: str = MEAN) -> np.ndarray:
        """h of the caption-map images at timestep ``t`` (one of ``t_maps``): pooled (N, C) or flat (N, C*h*w)."""
        if t not in self.store.timesteps:
            raise ValueError(f"t={t} is not in the caption-map store; t_maps: {sorted(self.store.timesteps)}")
        h = np.asarray(self.store.array("mid_block", t), np.float32)
        return h.mean((2, 3)) if check_pooling(form, H_FORMS, "form") == MEAN else h.reshape(len(h), -1)

    def rho_table(self) -> pd.DataFrame:
        """rho per attribute (rows) and seed set (columns), the worst set and all sets at once."""
        t = self.rho.pivot(index="attribute", columns="seed_set", values="rho")
        cols = self.seed_set_labels + [c for c in t.columns if c not in self.seed_set_labels]
        t = t.loc[self.config.attributes, cols]
        t.insert(len(self.seed_set_labels), "worst seed set", t[self.seed_set_labels].min(1))
        return t


def steps_of(model: DiffusionModel, timesteps: Sequence[int], steps: int) -> dict[int, int]:
    """{t: sampling step whose timestep is nearest to t} for a ``steps``-step run; when several t fall on one step
    (few steps), only the first of them is kept."""
    out: dict[int, int] = {}
    for t in timesteps:
        s = step_index(model, steps, int(t))
        if s not in out.values():
            out[int(t)] = s
    return out


def _seed_label(seed: int) -> str:
    return f"seeds {seed}+"


def bias_study(model: DiffusionModel, dataset, config: BiasStudyConfig | None = None,
               progress: bool = True) -> BiasStudy:
    """Run the bias study (module docstring) of ``model`` on the captioned ``dataset`` (an
    :class:`~revelio_nb.data.ImageDataset`; its class names are the nouns). Every sampling run and feature store
    is cached, so a rerun with the same config is cheap."""
    from .. import features

    cfg = (config or BiasStudyConfig()).validate()
    nouns = list(model.class_names or dataset.class_names)
    attrs = cfg.attributes
    cs = C.build_captions(dataset)
    truth = C.ground_truth(cs, dataset.split("train"))
    truth = truth[truth.attribute.isin(attrs)].reset_index(drop=True)

    # caption maps at each t of t_maps, keyed by the matching sampling step
    map_steps = steps_of(model, cfg.t_maps, cfg.steps)
    store = features.extract_features(features.ExtractionConfig(
        model=model.model_id, dataset=dataset.name, split="train", blocks=["mid_block"],
        timesteps=sorted(set(int(t) for t in cfg.t_maps)), pooling=MAP, max_images=cfg.map_max_images, seed=cfg.seed,
        batch_size=cfg.batch_size), model=model, dataset=dataset, progress=progress)
    caps = [cs.captions[i] for i in store.indices]
    word_maps = {}
    for t, step in map_steps.items():
        h = np.asarray(store.array("mid_block", t), np.float32)
        word_maps[step] = fit_word_map(h.reshape(len(h), -1) if cfg.form == FLAT else h.mean((2, 3)), caps,
                                         shrinkage=cfg.shrinkage if cfg.axis_method == "whitened" else None)

    # neutral prompts on independent seed sets (each also captures the retrieval steps)
    neutral = [C.neutral_prompt(n) for n in nouns]
    retrieval_steps = steps_of(model, cfg.retrieval_ts, cfg.steps) if cfg.retrieval_max_images else {}
    neutral_h, projections, scores, refs = {}, {}, {}, []
    for r in range(cfg.seed_sets):
        capture = set(map_steps.values()) | set(retrieval_steps.values())
        sc = SampleConfig(n_seeds=cfg.n_seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                            seed=cfg.seed_of(r), capture_steps=sorted(capture), h_condition="neutral",
                            batch_size=cfg.batch_size)
        label = _seed_label(cfg.seed_of(r))
        lat = prompt_h(model, neutral, sc, keep_images=True, keep_seeds=True, progress=progress)
        neutral_h[label] = lat
        projections[label] = caption_axis_projections(lat, word_maps, nouns, attrs, form=cfg.form,
                                                        method=cfg.axis_method, per_seed=True, mirror=cfg.mirror)
        scores[label] = scores_frame(combine_steps(projections[label].mean(1)), nouns, attrs)
        drawn = generated_attribute_scores(lat, nouns, attrs)
        refs.append(compare_with_ground_truth(drawn, truth, label="generated images (measured)")
                    .assign(seed_set=label))
    rho = rho_by_seed_set(projections, nouns, truth, attrs, n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)
    if len(projections) > 1:
        scores["all seed sets"] = scores_frame(
            combine_steps(np.concatenate(list(projections.values()), 1).mean(1)), nouns, attrs)

    # text-encoder baseline: the paper's prompt-pair axes on the frozen text encoder's embeddings
    prompts = attribute_prompts(nouns, attrs)
    base = text_encoder_embeddings(model, prompts["all"])
    te = bias_scores(base, nouns, attrs, form=MEAN)
    refs.append(compare_with_ground_truth(te, truth, label="text encoder").assign(seed_set="-"))

    retrieval = None
    if cfg.retrieval_max_images:
        test = features.extract_features(features.ExtractionConfig(
            model=model.model_id, dataset=dataset.name, split="test", blocks=["mid_block"],
            timesteps=sorted(retrieval_steps), pooling=MAP if cfg.form == FLAT else MEAN,
            max_images=cfg.retrieval_max_images, seed=cfg.seed, batch_size=cfg.batch_size),
            model=model, dataset=dataset, progress=progress)
        image_h = {t: np.asarray(test.array("mid_block", t), np.float32) for t in retrieval_steps}
        labels = np.asarray(dataset.labels)[test.indices]
        retrieval = pd.concat([caption_retrieval(lat, image_h, labels, nouns, retrieval_steps, form=cfg.form)
                               .assign(seed_set=label) for label, lat in neutral_h.items()], ignore_index=True)
    return BiasStudy(cfg, model.model_id, nouns, truth, cs, store, word_maps, map_steps, neutral_h, projections,
                     scores, rho, pd.concat(refs, ignore_index=True), te, retrieval)


# ------------------------------------------------------------------------------------------ summary


def readout_variants(study: BiasStudy, prompt_pass_h: PromptH | None = None
                     ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """rho of the study's score beside the other readouts, all on the first seed set: the caption-map axes of the
    other method (plain difference of means vs whitened) and on the other form (pooled vs flat); the paper's
    prompt-pair axes on ``prompt_pass_h`` (attribute prompts, prompt pass; flat, pooled,
    and centred on each class's own prompts); the text encoder (global and class centre); the attribute measured on
    the images the neutral prompts drew. Returns (rho rows with ``scores`` = readout name, {name: scores})."""
    nouns, attrs = study.nouns, study.config.attributes
    first = study.seed_set_labels[0]
    lat = study.neutral_h[first]
    cfg = study.config
    other_form = MEAN if cfg.form == FLAT else FLAT
    maps = {cfg.form: study.word_maps if study.word_maps[next(iter(study.word_maps))].whitened is not None else
            {step: fit_word_map(study.map_h(t, cfg.form), study.map_captions, shrinkage=cfg.shrinkage)
             for t, step in study.map_steps.items()},
            other_form: {step: fit_word_map(study.map_h(t, other_form), study.map_captions, shrinkage=cfg.shrinkage)
                         for t, step in study.map_steps.items()}}
    scores = {f"score: h neutral prompts, {cfg.form}, caption-map {cfg.axis_method} axes"
              f"{', mirror parity' if cfg.mirror and cfg.form == FLAT else ''}": study.scores[first]}
    plain = "mean_diff" if cfg.axis_method != "mean_diff" else "whitened"
    for form, method, mirror in ((cfg.form, cfg.axis_method, not cfg.mirror), (cfg.form, plain, cfg.mirror),
                                 (cfg.form, plain, not cfg.mirror), (other_form, cfg.axis_method, False)):
        if form == MEAN and mirror:
            continue
        label = f"h neutral prompts, {form}, caption-map {method} axes{', mirror parity' if mirror else ''}"
        scores[label] = caption_axis_bias(lat, maps[form], nouns, attrs, form=form, method=method, mirror=mirror)
    if prompt_pass_h is not None:
        for name, (form, centre) in {"h prompt pass, flat": (FLAT, "global"),
                                     "h prompt pass, mean": (MEAN, "global"),
                                     "h prompt pass, flat, class centre": (FLAT, "class")}.items():
            scores[name] = bias_scores(prompt_pass_h, nouns, attrs, form=form, centre=centre)
    scores["text encoder"] = study.text_encoder_scores
    scores["generated images (measured)"] = generated_attribute_scores(lat, nouns, attrs)
    rho = pd.concat([compare_with_ground_truth(sc, study.truth, label=k) for k, sc in scores.items()],
                    ignore_index=True)
    return rho, scores


def steering_summary(effects: pd.DataFrame, column: str = "rho_value_strength") -> pd.DataFrame:
    """Per attribute: whether the measured attribute's mean moves monotonically with strength and rho(strength)
    (from :func:`~revelio_nb.directions.steering_effect` rows of all attributes), the strengths used
    (``steer_strengths``, e.g. "-4 -2 0 2 4"), and the site steered when the rows say it
    (:func:`~revelio_nb.directions.steer_by_block`)."""
    agg = {"steer_monotonic": ("monotonic", "first"), "steer_rho": (column, "first")}
    if "strength" in effects:
        agg["steer_strengths"] = ("strength", lambda s: " ".join(f"{v:g}" for v in sorted(set(s))))
    if "block" in effects:
        agg = {"steer_block": ("block", "first"), **agg}
    if "rho_paired" in effects:
        agg["steer_rho_paired"] = ("rho_paired", "first")
    return effects.groupby("attribute", sort=False).agg(**agg)


def summary_table(studies: Sequence[BiasStudy], steering: dict[str, pd.DataFrame] | None = None,
                  following: pd.DataFrame | None = None) -> pd.DataFrame:
    """Notebook 06's summary: one row per (model, sampler, attribute).

    Columns: ``rho <seed set>`` with ``ci_low``/``ci_high <seed set>`` for every seed set (in the order of the
    first study), ``rho worst seed set``, ``rho all seed sets`` with its interval, ``rho text encoder``, ``rho
    generated images (worst set)``, ``truth range``, and, for a study whose label is a key of ``steering``
    (rows of :func:`~revelio_nb.directions.steering_effect`), ``steer_monotonic`` / ``steer_rho`` /
    ``steer_strengths`` (/ ``steer_rho_paired``, / ``steer_block``); ``prompt-following d`` from ``following``
    (:func:`~revelio_nb.directions.prompt_following`) for the first study's model. Seed sets are numbered
    ``set 1``, ``set 2``, ... in the columns.
    """
    rows = []
    for k, st in enumerate(studies):
        sets = st.seed_set_labels
        rr = st.rho.set_index(["seed_set", "attribute"])
        ref = st.references
        for a in st.config.attributes:
            row: dict[str, Any] = {"model": st.label, "sampler": st.config.sampler, "attribute": a,
                                   "n_seeds per set": st.config.n_seeds}
            for i, s in enumerate(sets):
                row[f"rho set {i + 1}"] = rr.loc[(s, a), "rho"]
                row[f"ci_low set {i + 1}"] = rr.loc[(s, a), "ci_low"]
                row[f"ci_high set {i + 1}"] = rr.loc[(s, a), "ci_high"]
            row["rho worst seed set"] = min(rr.loc[(s, a), "rho"] for s in sets)
            if ("all seed sets", a) in rr.index:
                for c in ("rho", "ci_low", "ci_high"):
                    row[f"{c} all seed sets"] = rr.loc[("all seed sets", a), c]
            te = ref[(ref.scores == "text encoder") & (ref.attribute == a)]
            row["rho text encoder"] = float(te.rho.iloc[0]) if len(te) else np.nan
            gen = ref[(ref.scores == "generated images (measured)") & (ref.attribute == a)]
            row["rho generated images (worst set)"] = float(gen.rho.min()) if len(gen) else np.nan
            tr = st.truth[st.truth.attribute == a]["rate"]
            row["truth range"] = float(tr.max() - tr.min())
            if steering and st.label in steering:
                s = steering_summary(steering[st.label])
                if a in s.index:
                    for c in s.columns:
                        row[c] = s.loc[a, c]
            if following is not None and k == 0:
                f = following.set_index("attribute")
                row["prompt-following d"] = float(f.loc[a, "d"]) if a in f.index else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def config_dict(cfg: BiasStudyConfig) -> dict[str, Any]:
    return asdict(cfg.validate())
