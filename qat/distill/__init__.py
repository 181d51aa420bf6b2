"""Knowledge distillation: the losses a quantized student learns from its float teacher.

    qat.distill.logits      kd_logit_loss, feature_mse / feature_cosine, FeatureTaps (forward hooks)
    qat.distill.lm_losses   token_kd_loss, head_kd_loss, masked_cross_entropy, causal_lm_loss (chunked)
    qat.distill.embedding   mean_pool, embedding_{cosine,mse,relation}_loss (sentence encoders)
    qat.distill.bank        bank_relation_loss against a fixed bank of teacher embeddings

The Lightning callback that applies them during training is `qat.lightning.distillation`.
"""

from qat.distill.bank import BANK_LOSSES, bank_cosines, bank_relation_loss, teacher_bank
from qat.distill.embedding import (
    embedding_cosine_loss,
    embedding_mse_loss,
    embedding_relation_loss,
    mean_pool,
)
from qat.distill.lm_losses import (
    DEFAULT_CHUNK_SIZE,
    causal_lm_loss,
    head_kd_loss,
    masked_cross_entropy,
    token_kd_loss,
)
from qat.distill.logits import (
    FEATURE_LOSSES,
    FeatureTaps,
    feature_cosine,
    feature_loss,
    feature_mse,
    kd_logit_loss,
)

__all__ = [
    "BANK_LOSSES",
    "DEFAULT_CHUNK_SIZE",
    "FEATURE_LOSSES",
    "FeatureTaps",
    "bank_cosines",
    "bank_relation_loss",
    "causal_lm_loss",
    "embedding_cosine_loss",
    "embedding_mse_loss",
    "embedding_relation_loss",
    "feature_cosine",
    "feature_loss",
    "feature_mse",
    "head_kd_loss",
    "kd_logit_loss",
    "masked_cross_entropy",
    "mean_pool",
    "teacher_bank",
    "token_kd_loss",
]
