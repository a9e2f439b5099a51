"""The factor library in force built from stored rows: superseded factors leave it, fuel defaults follow
their successors, and a second factor for one slot is refused."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from meterflow.carbon import load
from processing.carbon import library_from_rows, packaged_factor_rows

pytestmark = pytest.mark.unit


def _rows() -> list[dict[str, Any]]:
    rows = packaged_factor_rows()
    for r in rows:
        r["sources"] = orjson.loads(r["sources"])
        r["inputs"] = None if r["inputs"] is None else orjson.loads(r["inputs"])
        r["superseded_by"] = None
    return rows


def test_stored_packaged_rows_give_the_packaged_library() -> None:
    packaged = load()
    stored = library_from_rows(_rows())
    assert {f.id: f.value for f in stored.factors} == {f.id: f.value for f in packaged.factors}
    assert stored.electricity("location_based", 2025, "zhejiang") == packaged.electricity(
        "location_based", 2025, "zhejiang"
    )


def test_a_superseding_factor_takes_the_slot() -> None:
    rows = _rows()
    selected = load().electricity("location_based", 2023, None).factor_id
    old = next(r for r in rows if r["factor_id"] == selected)
    new = {
        **old,
        "factor_id": "corrected-2023-national",
        "value": 0.5,
        "status": "final",
        "superseded_by": None,
    }
    old["superseded_by"] = "corrected-2023-national"
    library = library_from_rows([*rows, new])
    assert library.electricity("location_based", 2023, None).factor_id == "corrected-2023-national"
    with pytest.raises(ValueError, match="same kind, region and year"):
        library_from_rows([*_rows(), new])


def test_fuel_defaults_follow_their_successor() -> None:
    rows = _rows()
    gas_id = load().fuel_defaults["natural_gas"]
    old = next(r for r in rows if r["factor_id"] == gas_id)
    new = {**old, "factor_id": "gas-v2", "superseded_by": None}
    old["superseded_by"] = "gas-v2"
    assert library_from_rows([*rows, new]).fuel("natural_gas").factor_id == "gas-v2"
