"""The actsparse-serialize plugin, registered through the ``actsparse`` entry-point group."""

from __future__ import annotations

from actsparse.core import Serializer, hookimpl
from actsparse.serialize._formats import (
    is_safetensors,
    is_torch_zip,
    safetensors_dumps,
    safetensors_loads,
    torch_dumps,
    torch_loads,
)
from actsparse.serialize._state import from_torch_ao, to_torch_ao


@hookimpl
def actsparse_serializers() -> list[Serializer]:
    return [
        Serializer(
            name="sparse_coo",
            dumps=to_torch_ao,
            loads=from_torch_ao,
            description="torch.ao's in-memory state dict: masks as sparse COO tensors",
        ),
        Serializer(
            name="safetensors",
            dumps=safetensors_dumps,
            loads=safetensors_loads,
            binary=True,
            suffix=".safetensors",
            sniff=is_safetensors,
            description="the default file: safetensors tensors, packed masks, JSON metadata; "
            "no pickle",
        ),
        Serializer(
            name="torch",
            dumps=torch_dumps,
            loads=torch_loads,
            binary=True,
            suffix=".pt",
            sniff=is_torch_zip,
            description="a torch.save file that torch.load(..., weights_only=True) reads",
        ),
    ]
