"""Partition keys: one parser, and nothing unsafe gets through."""

import pytest

from prism_assets import partitions


def test_cell_keys_round_trip():
    assert partitions.cells_for_splits(["S1_age", "S8_region"]) == [
        "baseline",
        "S1_age.A",
        "S1_age.B",
        "S8_region.A",
        "S8_region.B",
    ]
    assert partitions.parse_cell("S1_age.B") == ("S1_age", "B")
    assert partitions.parse_cell("baseline") == (None, None)


@pytest.mark.parametrize(
    "bad", ["S1;rm -rf /.A", "S1_age.C", "S1_age", "$(id).A", "S1|x.A", "a,b.A", ".A", "S1_age\n.A", "S1_age.A\n"]
)
def test_unsafe_or_malformed_cells_are_rejected(bad):
    with pytest.raises(ValueError, match=r"invalid (cell key|split name|group)"):
        partitions.parse_cell(bad)


def test_seed_keys_are_non_negative_integers():
    assert partitions.seed_key(3) == "3" and partitions.seed_key("0") == "0" and partitions.seed_key("10") == "10"
    assert partitions.seed_key(2**32 - 1) == "4294967295"
    for bad in ("-1", "x", "1.5", "0;ls", "01", "007", "²", "1\n", " 1", "4294967296"):
        with pytest.raises(ValueError, match="invalid seed"):
            partitions.seed_key(bad)
