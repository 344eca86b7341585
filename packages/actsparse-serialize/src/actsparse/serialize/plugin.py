"""The actsparse-serialize plugin, registered through the ``actsparse`` entry-point group."""

from __future__ import annotations

from actsparse.core import Serializer, hookimpl
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
    ]
