"""Walking a model's parameters and buffers, every path of shared ones included.

`state_slots` yields one `Slot` per (module, attribute) in `state_dict` order, with
non-persistent buffers too (they are stored, so a rebuilt skeleton needs no real
initialization) and without removing shared tensors: export records the second and
later names of a shared tensor as ties, and load assigns one tensor to every slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from torch import Tensor, nn


@dataclass
class Slot:
    """A parameter or buffer `attr` of `module`, reachable under `name`."""

    name: str
    module: nn.Module
    attr: str
    tensor: Tensor
    is_parameter: bool


Prune = Callable[[nn.Module, str], bool]


def state_slots(module: nn.Module, prefix: str = "", skip: Optional[Prune] = None) -> Iterator[Slot]:
    """Every parameter and buffer under `module`; `skip(module, attr_or_child)` leaves one out."""
    for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
        for attr, tensor in table.items():
            if tensor is not None and not (skip and skip(module, attr)):
                yield Slot(prefix + attr, module, attr, tensor, is_parameter)
    for child_name, child in module._modules.items():
        if child is not None and not (skip and skip(module, child_name)):
            yield from state_slots(child, f"{prefix}{child_name}.", skip)
