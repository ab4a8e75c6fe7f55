"""Vision encoders as feature sources for the same probes: the baselines Revelio compares diffusion features with.

Any ``transformers`` vision backbone of an allow-listed class (CLIP / SigLIP vision towers, DINOv2, ViT, ConvNeXt,
see :data:`ENCODER_CLASSES`), given by local folder or hub id, becomes a :class:`VisionEncoder`;
:func:`extract_encoder_features` writes its features into the same feature-store format as diffusion features, so
:mod:`revelio_nb.probes` reads them unchanged (:func:`revelio_nb.probes.encoder_runs` fits the probes). "Blocks"
of an encoder:

* ``cls``: the image-level vector: the CLS token after the final norm (CLIP's ``pooler_output``, DINOv2's normed
  CLS, ViT's CLS token); for models without a CLS token their own pooled output (SigLIP's attention-pooling head,
  ConvNeXt's normed global average); for ``CLIPVisionModelWithProjection`` the projected ``image_embeds``;
* ``mean``: the mean of the final layer's patch tokens (CLS and register tokens excluded) / of ConvNeXt's last map;
* ``patch``: the final layer's patch tokens on their grid, a spatial map (C, h, w) for Diff-C;
* ``layers.N``: the output of layer N (0 = embeddings) as a (C, h, w) grid (ConvNeXt: stage N's map).

An encoder has no timestep: its arrays are stored at the pseudo-timestep :data:`NO_TIMESTEP` (-1, as the pixel
baselines' rows). Grayscale images are repeated to 3 channels (PIL's ``convert("RGB")``). Weights are read from
safetensors only, through the concrete allow-listed class: never ``trust_remote_code``, never pickle.

Modules: :mod:`.allowlist` (allowed classes, blocks, :class:`EncoderError`), :mod:`.preprocess` (the
``preprocessor_config.json`` pipeline in torch), :mod:`.model` (:class:`VisionEncoder`, loading), :mod:`.extract`
(feature stores), :mod:`.tiny` (tiny random encoders for tests and smoke runs).
"""

from .allowlist import (BASE_BLOCKS, CLS_FROM_TOKEN, CONV_CLASSES, ENCODER_CLASSES, MODEL_TYPES, NO_TIMESTEP, SPLITS,
                        EncoderError)
from .extract import EncoderExtractionConfig, extract_encoder_features, extract_encoder_splits
from .model import VisionEncoder, describe_encoder, load_encoder, load_encoder_folder
from .preprocess import PROCESSOR_DEFAULTS, Preprocess, pil_resize
from .tiny import TINY_KINDS, save_tiny_random

__all__ = [
    "BASE_BLOCKS", "CLS_FROM_TOKEN", "CONV_CLASSES", "ENCODER_CLASSES", "MODEL_TYPES", "NO_TIMESTEP",
    "PROCESSOR_DEFAULTS", "SPLITS", "TINY_KINDS", "EncoderError", "EncoderExtractionConfig", "Preprocess",
    "VisionEncoder", "describe_encoder", "extract_encoder_features", "extract_encoder_splits", "load_encoder", "load_encoder_folder", "pil_resize",
    "save_tiny_random",
]
