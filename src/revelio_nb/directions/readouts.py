"""Notebook 06's readouts around the bias study: attribute prompts, score tables, clusters, named directions.

Each function is one step notebook 06 shows beside :func:`~revelio_nb.directions.bias_study`:
:func:`attribute_prompt_h` (every class's neutral and one-word prompts, prompt pass, images kept),
:func:`readout_table` / :func:`stack_scores` (the readouts of :func:`~revelio_nb.directions.readout_variants`),
:func:`bias_panels` (heatmap panels), :func:`ranking_table` and :func:`neutral_clusters` (the neutral prompts),
:func:`named_directions` and :func:`sae_latent_words` (words naming attribute axes, principal axes and SAE latents,
i.e. SAE units) and :func:`strip_panels` (a few classes of the steering strips).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import captions
from ..models import DiffusionModel
from ..pooling import FLAT, MEAN
from .axes import attribute_axis, attribute_prompts
from .bias import cluster_prompts, score_table
from .prompt_runs import PromptH, SampleConfig, prompt_h, text_encoder_embeddings
from .study import BiasStudy
from .word_maps import WordMap, fit_word_map, name_sae_latents, pca_directions


def attribute_prompt_h(model: DiffusionModel, nouns: Sequence[str], attributes: Sequence[str],
                       config: SampleConfig | None = None, progress: bool = True) -> PromptH:
    """h of every noun's neutral and one-word attribute prompts (:func:`attribute_prompts`), images kept: the
    paper's prompt pass, behind the prompt-pair axes, prompt following and the steering axes."""
    return prompt_h(model, attribute_prompts(nouns, attributes)["all"], config, keep_images=True, progress=progress)


def stack_scores(scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """{readout name: bias scores} as one long table (column ``scores`` = the readout name)."""
    return pd.concat([s.assign(scores=k) for k, s in scores.items()])


def readout_table(rho: pd.DataFrame, scores: dict[str, pd.DataFrame], attributes: Sequence[str]) -> pd.DataFrame:
    """rho of each readout (rows, in the order of ``scores``) per attribute (columns)."""
    return rho.pivot(index="scores", columns="attribute", values="rho").loc[list(scores), list(attributes)]


def bias_panels(study: BiasStudy, scores: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Class x attribute panels: the ground-truth rate, the study's score on all seed sets (the first readout of
    ``scores`` when there is one seed set), the text encoder and the generated images (readouts of
    :func:`~revelio_nb.directions.readout_variants`)."""
    attrs = study.config.attributes
    return {"ground truth (rate)": captions.rate_table(study.truth)[attrs],
            "diffusion h (all seed sets)": score_table(study.scores.get("all seed sets", next(iter(scores.values())))),
            "text encoder": score_table(scores["text encoder"]),
            "generated images": score_table(scores["generated images (measured)"])}


def ranking_table(study: BiasStudy) -> pd.DataFrame:
    """Rank of each class (rows) per attribute (columns; 1 = most "high") on the first seed set."""
    first = study.scores[study.seed_set_labels[0]]
    return first.pivot(index="class", columns="attribute", values="rank")[study.config.attributes]


def neutral_clusters(model: DiffusionModel, study: BiasStudy) -> dict[str, dict[str, Any]]:
    """Hierarchical clusters of the neutral prompts: on h (flat, first seed set) and on the text encoder."""
    neutral = [captions.neutral_prompt(n) for n in study.nouns]
    first = study.neutral_h[study.seed_set_labels[0]]
    return {"diffusion h": cluster_prompts(first, neutral, form=FLAT),
            "text encoder": cluster_prompts(text_encoder_embeddings(model, neutral), neutral, form=MEAN)}


def short_prompt(prompt: str) -> str:
    """A neutral prompt without its template words ("a drawing of a cat" -> "cat"), for figure labels."""
    return prompt.replace(captions.neutral_prompt(""), "").strip() or prompt


def named_directions(study: BiasStudy, prompt_pass_h: PromptH, t_map: int, n_pcs: int = 3, k: int = 3,
                     seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, WordMap]:
    """Words naming the prompt-pair attribute axes (pooled) and the first ``n_pcs`` principal axes of the
    caption-map images' pooled h at ``t_map``, by a ridge word map fitted on that h. Returns (named rows of
    :meth:`WordMap.name`, the pooled h, the word map)."""
    h = study.map_h(t_map, MEAN)
    wm = fit_word_map(h, study.map_captions, alpha=1.0)
    attrs = study.config.attributes
    axes = [attribute_axis(prompt_pass_h, study.nouns, a, form=MEAN) for a in attrs]
    pcs, evr = pca_directions(h, n=n_pcs, seed=seed)
    named = pd.concat([wm.name(axes, k=k, names=[f"axis {a}" for a in attrs]),
                       wm.name(pcs, k=k, names=[f"PC{i + 1} ({r:.0%})" for i, r in enumerate(evr)])])
    return named, h, wm


def sae_latent_words(study: BiasStudy, h: np.ndarray, word_map: WordMap, t_map: int, expansion: int = 2, k: int = 8,
                     epochs: int = 200, n_latents: int = 8, batch_size: int = 512, seed: int = 0
                     ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A k-SAE on the caption-map images' pooled h (``h`` of :func:`named_directions`) and its ``n_latents`` most
    frequent latents named by ``word_map`` (:func:`name_sae_latents`; cached beside the study's store)."""
    cfg = _h_sae_config(study, t_map, expansion, k, epochs, batch_size, seed)
    return name_sae_latents(h, word_map, cfg, key=f"06-{study.store.path.name}", n_latents=n_latents)


def _h_sae_config(study: BiasStudy, t_map: int, expansion: int, k: int, epochs: int, batch_size: int, seed: int):
    from .. import sae

    return sae.TrainConfig(sae=sae.SaeConfig(expansion_factor=expansion, k=k, hookpoint="mid_block", timestep=t_map,
                                             model_id=study.model_id), batch_size=batch_size, epochs=epochs, seed=seed)


def naming_vs_kind(study: BiasStudy, dataset, h: np.ndarray, sae_named: pd.DataFrame, t_map: int,
                   expansion: int = 2, k: int = 8, epochs: int = 200, batch_size: int = 512, seed: int = 0
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Does a word that names an SAE latent (:func:`sae_latent_words`) say what the latent measurably tracks?

    The same (cached) k-SAE on the caption-map images' pooled h gets a latent taxonomy
    (:func:`revelio_nb.taxonomy.sae_taxonomy`) on those images, with the study's attributes measured on the images
    themselves; each latent's top word is then checked against it (:func:`revelio_nb.taxonomy.compare_with_names`:
    "left" agrees when the latent tracks facing, a class noun when the latent separates that class). The images are
    the SAE's own training images (the caption maps' training split), not a held-out set. Returns (one row per
    named latent, agreement per word target)."""
    from .. import artifacts, sae, taxonomy

    cfg = _h_sae_config(study, t_map, expansion, k, epochs, batch_size, seed)
    model = sae.train_sae(np.asarray(h, np.float32), cfg, artifacts.array_sae_dir(
        h, cfg, label=f"06-{study.store.path.name}"), progress=False)
    labels, indices = taxonomy.store_image_rows(study.store)
    values = taxonomy.attribute_table(dataset, indices, names=list(study.config.attributes))
    tax = taxonomy.sae_taxonomy(model, np.asarray(h, np.float32), labels, values,
                                class_names=list(dataset.class_names))
    comparison = taxonomy.compare_with_names(sae_named, tax)
    return comparison, taxonomy.naming_summary(comparison)


def strip_panels(strips: dict[str, dict[float, Any]], nouns: Sequence[str], n_seeds: int, every: int = 3,
                 n_classes: int = 4, blocks: dict[str, str] | None = None
                 ) -> tuple[dict[str, dict[float, Any]], list[str]]:
    """A few classes (every ``every``-th, at most ``n_classes``), first seed each, of
    :func:`~revelio_nb.directions.steer_attributes` strips, keyed "attribute: low->high" ("attribute @ block: ..."
    with ``blocks``, e.g. :meth:`SteeringResult.blocks`); and the class names."""
    pick = list(range(0, len(nouns), every))[:n_classes]
    where = {a: f" @ {b}" for a, b in (blocks or {}).items()}
    show = {f"{a}{where.get(a, '')}: {captions.ATTRIBUTES[a].low}->{captions.ATTRIBUTES[a].high}":
            {s: imgs[::n_seeds][pick] for s, imgs in by_strength.items()} for a, by_strength in strips.items()}
    return show, [nouns[i] for i in pick]
