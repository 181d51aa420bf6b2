"""Recipes: one typed schema for a whole training run, and the reader that fills it from YAML.

    qat.recipe.schema    the dataclasses (Recipe and its sections), each checking its values
    qat.recipe.loading   load_recipe(path, overrides), load_recipe_text, recipe_to_yaml, hashes

Example:
    >>> recipe = load_recipe("recipes/digits_w4a4.yaml", ["optimizer.lr=3e-3", "trainer.max_epochs=5"])
    >>> recipe.quant.weight.bits
    4
"""

from qat.recipe.loading import (
    load_recipe,
    load_recipe_text,
    quant_spec_hash,
    recipe_hash,
    recipe_to_yaml,
    typed_recipe,
)
from qat.recipe.schema import (
    DistillConfig,
    ExportConfig,
    HFSource,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    PruneConfig,
    Recipe,
    ReportConfig,
    ScheduleConfig,
    TargetConfig,
    TrainerConfig,
)

__all__ = [
    "DistillConfig",
    "ExportConfig",
    "HFSource",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PruneConfig",
    "Recipe",
    "ReportConfig",
    "ScheduleConfig",
    "TargetConfig",
    "TrainerConfig",
    "load_recipe",
    "load_recipe_text",
    "quant_spec_hash",
    "recipe_hash",
    "recipe_to_yaml",
    "typed_recipe",
]
