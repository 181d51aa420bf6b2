"""Sharded QAT: FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's ModelParallelStrategy.

The model is prepared (fake-quant modules swapped in, scales created) before sharding;
`ShardedQATModule.configure_model` then shards every quantized layer (its weight, bias,
scale and zero point in one group) and the rest of the model at the root. Inside a
forward the parameters are whole tensors; outside one they are DTensors holding this
rank's rows, which `FakeQuantizer` handles: range initialization reads the whole weight
(`full_tensor`, a collective) and writes scales back as shards of rank 0's values, so
calibration ranges are the same on every rank. Checkpoints are gathered on rank 0 into
one ordinary Lightning file (`save_distributed_checkpoint=False`): `qat export` reads it
like any other, and a resume re-shards it.

Strategies (`trainer.strategy`):
    fsdp2   FSDP2 over all devices (ModelParallelStrategy with data_parallel_size=devices)
    fsdp    refused: Lightning's FSDPStrategy (FSDP1) needs CUDA, so it cannot be tested here,
            and its flat parameters hold a layer's weight and scales in one buffer (one dtype:
            fp32 scales beside bf16 weights fail, Lightning issue 20239); use fsdp2

Example:
    >>> strategy = sharded_strategy("fsdp2", devices=2)    # None for 'ddp', 'auto', ...
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Union

from torch import nn

from qat.config import ConfigError
from qat.lightning.distributed import process_group_timeout
from qat.lightning.module import QATModule
from qat.modules import QuantModule
from qat.recipe import Recipe

SHARDED_STRATEGIES = ("fsdp2",)
REFUSED_STRATEGIES = {
    "fsdp": "Lightning's FSDPStrategy (FSDP1) is not supported for QAT: it needs CUDA (untested here) and flattens "
            "a layer's weight and its fp32 scales into one buffer of one dtype (Lightning issue 20239); "
            "use trainer.strategy=fsdp2 (FSDP2 via ModelParallelStrategy) or ddp",
}


def is_sharded(strategy: str) -> bool:
    """True for the strategies that shard parameters (the model needs `ShardedQATModule`)."""
    return strategy in SHARDED_STRATEGIES


def check_strategy(strategy: str) -> None:
    """Raise ConfigError for a strategy qat refuses, naming the one to use instead."""
    if strategy in REFUSED_STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r}: {REFUSED_STRATEGIES[strategy]}")


def check_sharded_run(recipe: Recipe) -> None:
    """Refuse what a sharded run cannot do: a refused strategy, or exporting at the end of training
    (rank 0 alone would need the whole model; export the gathered checkpoint with `qat export` instead)."""
    check_strategy(recipe.trainer.strategy)
    if is_sharded(recipe.trainer.strategy) and recipe.export.enabled:
        raise ConfigError(
            f"export.enabled with trainer.strategy={recipe.trainer.strategy!r}: export after the run from its "
            "gathered checkpoint instead: `qat export RUN_DIR OUT.safetensors` (checkpoints/last.ckpt)"
        )


def sharded_strategy(strategy: str, devices: Union[int, str, list]) -> Optional[Any]:
    """Lightning's strategy object for a sharded `strategy` name, else None."""
    check_strategy(strategy)
    if not is_sharded(strategy):
        return None

    if not isinstance(devices, int):
        raise ConfigError(f"trainer.strategy={strategy!r} needs trainer.devices as a number, got {devices!r}")
    return _qat_model_parallel_strategy()(data_parallel_size=devices, tensor_parallel_size=1,
                                          save_distributed_checkpoint=False, timeout=process_group_timeout())


EXTRA_STATE_SUFFIX = "._extra_state"


def apply_extra_states(module: nn.Module, state_dict: dict) -> int:
    """Give every submodule its `_extra_state` entry of `state_dict` (keys relative to `module`)."""
    applied = 0
    for key, value in state_dict.items():
        if key.endswith(EXTRA_STATE_SUFFIX):
            module.get_submodule(key[: -len(EXTRA_STATE_SUFFIX)]).set_extra_state(value)
            applied += 1
    return applied


def _qat_model_parallel_strategy() -> type:
    """ModelParallelStrategy that also restores module extra states (quantizer switches) on resume:
    Lightning loads a full checkpoint into a sharded model one tensor at a time, which skips them."""
    from pytorch_lightning.strategies import ModelParallelStrategy

    class QATModelParallelStrategy(ModelParallelStrategy):
        def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict:
            import torch

            saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
            extra = {k: v for k, v in saved.items() if k.endswith(EXTRA_STATE_SUFFIX)}
            checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
            apply_extra_states(self.lightning_module, extra)
            return checkpoint

    return QATModelParallelStrategy


def check_shardable(model: nn.Module) -> None:
    """FSDP2 shards along dim 0 and refuses 0-dim parameters: name any (per-tensor scales) clearly."""
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError(
            f"FSDP2 cannot shard 0-dim parameters: {', '.join(scalars[:5])}; per-tensor quantizers have 0-dim "
            "scales, use granularity 'channel' (or 'group') for them, or trainer.strategy=ddp"
        )


def _uses(modules: list[nn.Module]) -> Counter:
    """How many times each parameter (by id) appears under `modules`, shared submodules counted per owner."""
    return Counter(id(p) for module in modules for _, p in module.named_parameters(remove_duplicate=False))


def layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The quantized layers as FSDP2 groups: one per layer, layers that share a weight (a tied embedding
    and output head, with their one quantizer) in one group, since FSDP2 refuses a parameter managed by
    two groups. A shared parameter also used outside the quantized layers leaves its group to the root."""
    layers = [module for module in model.modules() if isinstance(module, QuantModule)]
    groups: list[list[nn.Module]] = []
    for layer in layers:
        mine = set(_uses([layer]))
        joined = [group for group in groups if mine & set(_uses(group))]
        groups = [group for group in groups if all(group is not other for other in joined)]
        groups.append([module for group in joined for module in group] + [layer])
    everywhere = _uses([model])
    return [group for group in groups if all(everywhere[key] == count for key, count in _uses(group).items())]


def shard_model(model: nn.Module, mesh: Any) -> None:
    """fully_shard every quantized layer (tied ones together), then the root (embeddings, norms, the rest)."""
    from torch.distributed.fsdp import fully_shard

    check_shardable(model)
    for group in layer_groups(model):
        fully_shard(group if len(group) > 1 else group[0], mesh=mesh)
    fully_shard(model, mesh=mesh)


class ShardedQATModule(QATModule):
    """QATModule whose model is sharded with FSDP2 on Lightning's device mesh in `configure_model`."""

    def configure_model(self) -> None:
        if getattr(self, "_qat_sharded", False):
            return
        shard_model(self.model, self.device_mesh["data_parallel"])
        self._qat_sharded = True
