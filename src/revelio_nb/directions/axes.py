"""Directions in h-space from words: prompt differences, attribute axes, caption-map word axes.

:func:`concept_direction` (h(with word) - h(without)), :func:`attribute_axis` (an attribute's word pair averaged
over nouns; :func:`attribute_axes_by_step`: one per sampling step), :func:`word_axis` (high word - low word of a
caption map) and :func:`mirror_axis` (the part of a flattened spatial axis with a given left-right parity);
:func:`attribute_prompts` lists every prompt these need.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..captions import ATTRIBUTES, attribute_prompt, neutral_prompt
from ..pooling import FLAT, MEAN
from .prompt_runs import PromptH
from .word_maps import WordMap, unit


def concept_direction(lat: PromptH, with_word: str | Sequence[str], without: str | Sequence[str],
                      form: str = MEAN, normalise: bool = True) -> np.ndarray:
    """h(with) - h(without), averaged over prompt pairs (e.g. "a drawing of a large cat" - "a drawing of a cat")."""
    a = np.atleast_2d(lat.get([with_word] if isinstance(with_word, str) else list(with_word), form))
    b = np.atleast_2d(lat.get([without] if isinstance(without, str) else list(without), form))
    if len(a) != len(b):
        raise ValueError(f"{len(a)} prompts with the word but {len(b)} without: pass pairs")
    d = (a - b).mean(0)
    return unit(d) if normalise else d


def attribute_prompts(nouns: Sequence[str], attributes: Sequence[str] | None = None,
                      template: str | None = None) -> dict[str, Any]:
    """Every prompt the bias analysis needs: neutral and one-word prompts per noun (see :func:`captions.attribute_prompt`)."""
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    kw = {} if template is None else {"template": template}
    neutral = {n: neutral_prompt(n, **kw) for n in nouns}
    pairs = {(n, a, w): attribute_prompt(n, a, w, **kw) for n in nouns for a in attributes for w in ATTRIBUTES[a].words}
    return {"neutral": neutral, "pairs": pairs, "all": list(neutral.values()) + list(pairs.values())}


def attribute_axis(lat: PromptH, nouns: Sequence[str], attribute: str, form: str = MEAN,
                   normalise: bool = True, template: str | None = None) -> np.ndarray:
    """Axis of an attribute from its word pair, averaged over nouns: mean_n [h(high, n) - h(low, n)]."""
    a = ATTRIBUTES[attribute]
    kw = {} if template is None else {"template": template}
    high = [attribute_prompt(n, attribute, a.high, **kw) for n in nouns]
    low = [attribute_prompt(n, attribute, a.low, **kw) for n in nouns]
    return concept_direction(lat, high, low, form, normalise)


def attribute_axes_by_step(lat: PromptH, nouns: Sequence[str], attribute: str, timesteps: Sequence[int],
                           form: str = FLAT, normalise: bool = False,
                           template: str | None = None) -> dict[int, np.ndarray]:
    """The attribute axis of each captured sampling step, keyed by that step's timestep ({t: axis}), for
    steering with the direction h actually takes at each step (:class:`SteeringHook` takes the mapping).

    ``timesteps`` lists the timestep of every step of the run behind ``lat`` (:func:`step_timesteps`).
    """
    if not lat.capture_steps:
        raise ValueError(f"these prompt h ({lat.source}) have no capture steps")
    if len(timesteps) <= max(lat.capture_steps):
        raise ValueError(f"{len(timesteps)} timesteps given, but step {max(lat.capture_steps)} was captured")
    return {int(timesteps[s]): attribute_axis(lat.at_step(s), nouns, attribute, form, normalise, template)
            for s in lat.capture_steps}


def word_axis(word_map: "WordMap", attribute: str, method: str = "mean_diff") -> np.ndarray:
    """An attribute axis from the caption map: word vector of the high word minus that of the low word (unit);
    ``method``: "mean_diff", "ridge" or "whitened" (see :func:`fit_word_map`)."""
    a = ATTRIBUTES[attribute]
    return unit(word_map.word(a.high, method) - word_map.word(a.low, method))


def mirror_axis(axis: np.ndarray, shape: Sequence[int], parity: int) -> np.ndarray:
    """The part of a flattened spatial axis ((C*h*w,), block output ``shape`` (C, h, w)) with the given mirror
    parity: (a + parity * mirrored a) / 2, mirrored = flipped left-right. An attribute that survives mirroring
    the image (size, shape, texture: parity +1) has a mirror-symmetric axis, one that flips sign (facing: -1) an
    antisymmetric one; the other part is estimation noise (or something else the words co-occur with), since h of a
    mirrored image is close to the mirrored h (convolutions, up to their kernels' own asymmetry)."""
    if parity not in (1, -1):
        raise ValueError(f"mirror parity must be +1 or -1, got {parity!r}")
    a = np.asarray(axis, dtype=np.float64)
    if len(shape) != 3 or a.size != int(np.prod(shape)):
        raise ValueError(f"an axis of {a.size} values is not a flattened (C, h, w) map of shape {tuple(shape)}")
    m = a.reshape(shape)
    return ((m + parity * m[..., ::-1]) / 2).reshape(a.shape)
