"""Meter exchange install reads and multiplier schedules, looked up per read."""

from __future__ import annotations

import numpy as np
import pytest

from processing.registry import RegistryView

pytestmark = pytest.mark.unit

KEY = ("t1", "m1", "energy_import_kwh")


def test_install_reads_only_at_registered_exchanges_and_multipliers_from_their_effective_time() -> None:
    registry = RegistryView()
    registry.exchanges[KEY] = [(120_000, 5.0), (300_000, 7.5)]
    registry.multipliers[("t1", "m1")] = [(100_000, 40.0), (250_000, 80.0)]
    ts = np.array([60_000, 100_000, 120_000, 200_000, 250_000, 300_000, 400_000], np.int64)
    install, multiplier = registry.schedules(KEY, ts)
    assert install is not None and multiplier is not None
    np.testing.assert_array_equal(install, [np.nan, np.nan, 5.0, np.nan, np.nan, 7.5, np.nan])
    np.testing.assert_array_equal(multiplier, [1.0, 40.0, 40.0, 40.0, 80.0, 80.0, 80.0])


def test_a_series_without_exchanges_or_multipliers_has_no_schedule() -> None:
    registry = RegistryView()
    registry.multipliers[("t1", "other")] = [(0, 2.0)]
    assert registry.schedules(KEY, np.array([1, 2], np.int64)) == (None, None)
