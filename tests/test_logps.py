"""TRL's pair tokenization rules: where the completion starts, and keep_end truncation."""

from prism_assets.training.logps import common_prefix_length, split_pair


def test_pair_split_and_truncation_rules():
    assert [
        common_prefix_length(a, b)
        for a, b in [([1, 2, 3], [1, 2, 3, 4]), ([1, 2, 3, 4], [1, 2]), ([1, 2, 5], [1, 2, 3]), ([], [1]), ([2], [1])]
    ] == [3, 2, 2, 0, 0]
    # the prompt's generation prompt [9] is not what the conversations continue with: the completion starts at 9 ≠ 7
    (chosen, rejected) = split_pair([1, 2, 9], [1, 2, 7, 8], [1, 2, 6], max_length=3)
    assert chosen == ([2], [7, 8]) and rejected == ([1, 2], [6])  # keep_end: the last 3 tokens of each
    assert split_pair([1], [1, 2, 3, 4], [1, 5], max_length=2)[0] == ([], [3, 4])  # longer than max: completion's end
