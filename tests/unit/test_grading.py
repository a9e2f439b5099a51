"""Carbon-efficiency grading: Zhejiang bands at their edges, peer-set refusal, industry average."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.grading import Peer, Scheme, grade, intensity, load_schemes

pytestmark = pytest.mark.unit

ZJ = "zhejiang-carbon-efficiency"


def _scheme() -> Scheme:
    return load_schemes().schemes[ZJ]


def test_intensity_is_tonnes_per_ten_thousand_cny() -> None:
    assert intensity(co2e_kg=6_000, value_added_cny=100_000) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("l_value", "level"),
    [
        (0.0, "low-carbon"),
        (0.6, "low-carbon"),
        (0.6000001, "medium-carbon"),
        (2.0, "medium-carbon"),
        (2.01, "high-carbon"),
    ],
)
def test_levels_across_all_industry(l_value: float, level: str) -> None:
    assert grade(ZJ, _scheme(), l_value, None, [], 5).level == level


@pytest.mark.parametrize(
    ("k", "expected"),
    [(0.5, 1), (0.6, 1), (0.7, 2), (0.8, 2), (1.0, 3), (1.2, 3), (1.5, 4), (2.0, 4), (2.5, 5)],
)
def test_grade_bands_on_k(k: float, expected: int) -> None:
    # Five peers whose pooled intensity is exactly 1.0 t / 10^4 CNY.
    peers = [Peer(f"p{i}", co2e_kg=1000.0, value_added_cny=10_000.0) for i in range(5)]
    g = grade(ZJ, _scheme(), k, "C33", peers, 5)
    assert g.industry_average == pytest.approx(1.0)
    assert g.k == pytest.approx(k)
    assert (g.grade, g.label, g.refused) == (expected, f"grade {expected}", None)


def test_industry_average_is_a_ratio_of_sums() -> None:
    peers = [Peer("big", 900_000.0, 10_000_000.0), Peer("small", 1_000.0, 10_000.0)]
    g = grade(ZJ, _scheme(), 1.0, "C33", peers, 2)
    # Sum of tonnes over sum of 10^4 CNY, not the mean of 0.9 and 1.0.
    assert g.industry_average == pytest.approx((901.0) / (1001.0))


def test_refuses_to_grade_a_small_peer_set_but_gives_the_level() -> None:
    g = grade(ZJ, _scheme(), 1.0, "C33", [Peer("a", 1.0, 1.0)], 5)
    assert g.grade is None and g.label is None and g.k is None
    assert g.refused is not None and "at least 5" in g.refused
    assert g.level == "medium-carbon"
    no_industry = grade(ZJ, _scheme(), 1.0, None, [], 1)
    assert no_industry.refused == "the enterprise has no industry code"


def test_bands_must_increase_and_end_open() -> None:
    base = _scheme().model_dump()
    with pytest.raises(ValidationError):
        Scheme.model_validate(
            {
                **base,
                "grades": [{"upto": 1.0, "grade": 1}, {"upto": 0.5, "grade": 2}, {"upto": None, "grade": 3}],
            }
        )
    with pytest.raises(ValidationError):
        Scheme.model_validate({**base, "levels": [{"upto": 1.0, "label": "a"}]})
