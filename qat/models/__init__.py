"""Small reference models for recipes and tests (`_target_: qat.models.DigitsCNN`).

    DigitsCNN   two 3x3 convs with BatchNorm, a pool, two linear layers: 8x8 digits -> 10 classes
    TinyLM      a tiny language model for the synthetic-token recipe

Real pretrained models come through `qat.hf` (Hugging Face folders and GGUF files).
"""

from qat.models.digits_cnn import DigitsCNN
from qat.models.tiny_lm import TinyLM

__all__ = ["DigitsCNN", "TinyLM"]
