"""Draft acceptance, checked against examples worked by hand."""
import math

import pytest
import torch

from loop.train.acceptance import closed_form_tokens_per_step, expected_accepted, token_acceptance


def test_alpha_is_the_overlap_of_the_two_distributions():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5], [0.0, 1.0, 0.0]])
    # min(.5,.25)+min(.5,.25)+min(0,.5) = 0.5; disjoint supports accept nothing.
    assert token_acceptance(p, q).tolist() == [0.5, 0.0]
    assert token_acceptance(p, p).tolist() == [1.0, 1.0]


def test_expected_accepted_by_hand():
    # alphas .5, .5 and k=2: from t=0, .5 + .5*.5 = .75; from t=1 the window ends after .5 -> mean .625.
    assert expected_accepted([[0.5, 0.5]], k=2) == pytest.approx(0.625)
    # k=1 is the mean alpha; two sequences are not joined into one window.
    assert expected_accepted([[0.2, 0.4], [0.9]], k=1) == pytest.approx(0.5)
    assert expected_accepted([[0.5], [0.5]], k=2) == pytest.approx(0.5)
    # A perfect draft gets all k accepted where the sequence is long enough.
    assert expected_accepted([[1.0] * 10], k=3) == pytest.approx((3 * 8 + 2 + 1) / 10)


def test_long_constant_sequence_approaches_the_closed_form():
    alpha, k = 0.7, 4
    got = expected_accepted([[alpha] * 10_000], k)
    assert got + 1 == pytest.approx(closed_form_tokens_per_step(alpha, k), rel=1e-3)
    assert closed_form_tokens_per_step(alpha, k) == pytest.approx((1 - alpha ** 5) / (1 - alpha))
    assert closed_form_tokens_per_step(1.0, k) == 5
    assert math.isclose(closed_form_tokens_per_step(0.0, k), 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        expected_accepted([[0.5]], k=0)
    with pytest.raises(ValueError, match="position"):
        expected_accepted([[]], k=2)
