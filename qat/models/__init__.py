"""Small reference models for recipes and tests (`_target_: qat.models.DigitsCNN`).

    DigitsCNN         two 3x3 convs with BatchNorm, a pool, two linear layers: 8x8 digits -> 10 classes
    TinyLM            a tiny language model for the synthetic-token recipe
    EfficientNetLite  Google's mobile image classifier (lite0-4; pretrained=True: ImageNet lite0 weights),
                      conv->BN Sequentials and a QuantPoint on every tensor between ops

Other real pretrained models come through `qat.hf` (Hugging Face folders and GGUF files).
"""

from qat.models.digits_cnn import DigitsCNN
from qat.models.efficientnet_lite import EfficientNetLite
from qat.models.tiny_lm import TinyLM

__all__ = ["DigitsCNN", "EfficientNetLite", "TinyLM"]
