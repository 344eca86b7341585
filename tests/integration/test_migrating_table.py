"""docs/migrating.md's table: each torch.ao function and its registered name agree.

The table's first column is Python (a lambda, or a function that a python
block of the page defines); every row is checked on random data, so the
table cannot claim an equivalence that does not hold.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from actsparse.core import get_registry

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "migrating.md"
ROW = re.compile(
    r"^\| `(?P<code>[^`]+)`(?: \(below\))? \| `(?P<argument>\w+_fn)` \| "
    r"`\"(?P<name>\w+)\"` \| (?:`(?P<config>[^`]*)`)? *\|$"
)
KINDS = {"aggregate_fn": "aggregate", "reduce_fn": "reduce", "mask_fn": "mask"}


def _page_namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {"torch": torch}
    text = PAGE.read_text()
    for block in re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
        exec(compile(block, str(PAGE), "exec"), namespace)  # the page's own definitions
    return namespace


def _rows() -> list[dict[str, str]]:
    rows = [m.groupdict() for line in PAGE.read_text().splitlines() if (m := ROW.match(line))]
    assert len(rows) >= 9, "the table of torch.ao functions is missing from docs/migrating.md"
    return rows


ROWS = _rows()


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['name']}: {r['code']}" for r in ROWS])
@pytest.mark.parametrize("seed", range(5))
def test_the_function_and_the_name_agree(row: dict[str, str], seed: int) -> None:
    function = eval(row["code"], _page_namespace())  # the table's own code
    record = get_registry().get(KINDS[row["argument"]], row["name"])
    config = eval(f"dict({row['config'] or ''})")
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(4, 3, 5, generator=generator)
    if row["argument"] == "aggregate_fn":
        other = torch.randn(4, 3, 5, generator=generator)
        torch.testing.assert_close(record.fn(data, other), function(data, other))
        torch.testing.assert_close(
            record.fn(torch.zeros_like(data), data), function(0 * data, data)
        )
    elif row["argument"] == "reduce_fn":
        torch.testing.assert_close(record.fn(data), function(data))
    else:
        reduced = data.mean(0)  # distinct magnitudes: the ranking has no ties
        torch.testing.assert_close(record.fn(reduced, **config), function(reduced, **config))
        record.check(config)  # the row's sparse_config is one registration accepts


def test_every_registered_name_in_the_table_exists() -> None:
    registry = get_registry()
    for row in ROWS:
        assert row["name"] in registry.names(KINDS[row["argument"]]), row
