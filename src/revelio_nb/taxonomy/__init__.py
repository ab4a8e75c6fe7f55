"""Automatic latent taxonomy: what kind of thing each SAE latent tracks, measured on held-out images.

For every latent of a k-SAE, from its **sparse code** (post-TopK image scores, :class:`latent_store.ImageScores`: the
activation for pooled SAEs, the maximum over positions for spatial ones; 0 where it does not fire) on the
held-out split:

* **class selectivity**: the one-vs-rest AUROC of its image score for each class; ``class_auroc`` is the best.
* **attribute selectivity**: for each attribute of :mod:`revelio_nb.attributes` measured on the same images, the
  Spearman rank correlation of image score and attribute **within classes** (ranks taken inside each class, scaled
  by the class size and pooled), so an attribute that merely differs between classes (elephants are large) does not
  make a class latent look like a size latent; ``attribute_rho`` is the signed value of the largest ``|rho|``. The
  plain (across-class) Spearman rho of the same attribute is reported beside it (``attribute_rho_raw``).
  Attributes undefined on the images are skipped, and of two attributes with ``|rho| > max_attribute_rho`` on the
  images the first in the registry's order is kept (on Animal-MNIST a silhouette's brightness is its size).

**The rule.** A latent that never fires on the held-out split is **dead**. A live latent is

* **class-specific** when ``class_auroc >= tau_class`` and ``|attribute_rho| < tau_attr``,
* **attribute-specific** when ``|attribute_rho| >= tau_attr`` and ``class_auroc < tau_class`` (``label`` = the
  attribute, its sign in ``attribute_rho``),
* **mixed** when both hold (a class latent that also orders the images of its classes by an attribute),
* **unexplained** when neither does.

**Thresholds** are calibrated against a null: the same scores recomputed after shuffling the class labels across
images (class null) and the attribute values within classes (attribute null), ``n_shuffles`` times; each
threshold is the ``null_quantile`` quantile of the null's best score over live latents and shuffles, and an effect
size must also be met (``min_class_auroc``, ``min_attribute_rho``: set near the 90th percentile of a random-init
model's SAE latents, the second null below, so that a kind means more than what architecture and pixels give).
For classes the null is taken on the AUROC's z-score (:func:`auroc_z`: a sparse latent's AUROC varies less by
chance than a dense one's), so a class-specific latent has ``class_auroc >= min_class_auroc`` *and* ``class_z``
beyond 99 % of what chance gives any latent.
The rule above reads "``class_auroc >= tau_class``" as both conditions. The second null, the same
taxonomy for the SAE of a random-init model of the same architecture (:func:`revelio_nb.probes.random_init_model`),
tells what the architecture alone gives (notebook 07).

**Stability**: :func:`match_latents` pairs the latents of two SAEs (another seed) by decoder cosine (Hungarian
matching) and :func:`stability` reports the fraction of live latents that keep their kind.

Modules: :mod:`.config` (kinds, config, result), :mod:`.scores` (selectivity scores, nulls, the rule),
:mod:`.assign` (one SAE's taxonomy), :mod:`.stability`, :mod:`.plots`, :mod:`.claims` (the paper's block claims),
:mod:`.naming` (word names vs kinds).
"""

from .assign import (
    attribute_table,
    latent_taxonomy,
    prepare_attributes,
    sae_taxonomy,
    store_image_rows,
)
from .claims import PAPER_CLAIMS, claim_blocks, claim_table, finding_paragraph
from .config import KIND_COLORS, KINDS, META_FILE, NULL_FILE, TABLE_FILE, Taxonomy, TaxonomyConfig, TaxonomyError
from .naming import compare_with_names, naming_summary, word_targets
from .plots import (
    kinds_long,
    plot_kind_examples,
    plot_kinds,
    plot_selectivity,
    summarize,
    summary_row,
    top_latents_by_kind,
)
from .scores import assign_kinds, auroc_z, calibrate, centered_ranks, class_auroc, null_scores, rank_correlation
from .stability import decoder_directions, kind_confusion, match_latents, stability

__all__ = [
    "KINDS",
    "KIND_COLORS",
    "META_FILE",
    "NULL_FILE",
    "TABLE_FILE",
    "PAPER_CLAIMS",
    "Taxonomy",
    "TaxonomyConfig",
    "TaxonomyError",
    "assign_kinds",
    "attribute_table",
    "auroc_z",
    "calibrate",
    "centered_ranks",
    "claim_blocks",
    "claim_table",
    "class_auroc",
    "compare_with_names",
    "decoder_directions",
    "finding_paragraph",
    "kind_confusion",
    "kinds_long",
    "latent_taxonomy",
    "match_latents",
    "naming_summary",
    "null_scores",
    "plot_kind_examples",
    "plot_kinds",
    "plot_selectivity",
    "prepare_attributes",
    "rank_correlation",
    "sae_taxonomy",
    "stability",
    "store_image_rows",
    "summarize",
    "summary_row",
    "top_latents_by_kind",
    "word_targets",
]
