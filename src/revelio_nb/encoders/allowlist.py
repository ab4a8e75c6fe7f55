"""Which vision backbones may load (an allow-list of concrete ``transformers`` classes: remote code is never run),
what their outputs are, the blocks every encoder has, and :class:`EncoderError`.
"""

from __future__ import annotations


NO_TIMESTEP = -1  # the pseudo-timestep of encoder arrays (an encoder sees clean images once)
SPLITS = ("train", "val", "test")
BASE_BLOCKS = ("cls", "mean", "patch")

# config.json "architectures" entry -> the transformers class that is loaded (a full CLIP / SigLIP checkpoint: its
# vision tower; an image classifier: its backbone without the head)
ENCODER_CLASSES: dict[str, str] = {
    "CLIPVisionModel": "CLIPVisionModel",
    "CLIPVisionModelWithProjection": "CLIPVisionModelWithProjection",
    "CLIPModel": "CLIPVisionModel",
    "SiglipVisionModel": "SiglipVisionModel",
    "SiglipModel": "SiglipVisionModel",
    "Dinov2Model": "Dinov2Model",
    "Dinov2WithRegistersModel": "Dinov2WithRegistersModel",
    "ViTModel": "ViTModel",
    "ViTForImageClassification": "ViTModel",
    "ConvNextModel": "ConvNextModel",
    "ConvNextForImageClassification": "ConvNextModel",
    "ConvNextV2Model": "ConvNextV2Model",
    "ConvNextV2ForImageClassification": "ConvNextV2Model",
}
# config.json "model_type" -> class, for folders whose config has no "architectures"
MODEL_TYPES: dict[str, str] = {
    "clip_vision_model": "CLIPVisionModel", "clip": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipVisionModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
    "vit": "ViTModel", "convnext": "ConvNextModel", "convnextv2": "ConvNextV2Model",
}
CONV_CLASSES = ("ConvNextModel", "ConvNextV2Model")  # outputs are (B, C, h, w) maps, not token sequences
CLS_FROM_TOKEN = ("ViTModel",)  # ViT's pooler is an extra dense + tanh: its CLS token is used instead


class EncoderError(ValueError):
    """A vision encoder could not be resolved, loaded or used as asked."""
