"""scripts/train_bundled.py: the extra training sets draw their generator parameters as stated."""

import numpy as np
import pytest

from cp3d.core.synth import random_volume

def test_embryo_like_set_draws_each_parameter_in_its_range_reproducibly(load_script):
    tb = load_script("train_bundled")
    kw = dict(min_objects=1, diameters=tb.UNEVEN_DIAMETERS, anisotropies=tb.UNEVEN_ANISOTROPIES,
              ranges=tb.UNEVEN_RANGES)
    seeds = range(tb.UNEVEN_SEEDS_FROM, tb.UNEVEN_SEEDS_FROM + 2)
    samples, vols = tb.build_samples(seeds, 1, 2, "nuclei", **kw)
    again, vols_again = tb.build_samples(seeds, 1, 2, "nuclei", **kw)
    assert vols == vols_again and len(samples) == len(again) > 0
    for seed, diameter, anisotropy, snr in vols:
        assert tb.UNEVEN_DIAMETERS[0] <= diameter <= tb.UNEVEN_DIAMETERS[1]
        assert tb.UNEVEN_ANISOTROPIES[0] <= anisotropy <= tb.UNEVEN_ANISOTROPIES[1]
        assert tb.UNEVEN_RANGES["snr"][0] <= snr <= tb.UNEVEN_RANGES["snr"][1]
    # the same seed without the set's ranges draws other parameters: the ranges took effect
    _, _, plain = random_volume(tb.UNEVEN_SEEDS_FROM, "nuclei")
    assert round(plain["snr"], 1) != vols[0][3] or round(plain["anisotropy"], 2) != vols[0][2]


def test_unknown_generator_parameter_in_a_range_is_refused(load_script):
    tb = load_script("train_bundled")
    with pytest.raises(ValueError, match="no_such"):
        tb.build_samples([tb.UNEVEN_SEEDS_FROM], 1, 2, "nuclei", ranges={"no_such": (1.0, 2.0)})


def test_tiny_set_draws_small_sparse_nuclei(load_script):
    tb = load_script("train_bundled")
    seeds = range(tb.TINY_SEEDS_FROM, tb.TINY_SEEDS_FROM + 3)
    samples, vols = tb.build_samples(seeds, 1, 2, "nuclei", min_objects=1,
                                     diameters=tb.TINY_DIAMETERS, ranges=tb.TINY_RANGES)
    assert len(samples) > 0
    for seed, diameter, _, _ in vols:
        assert tb.TINY_DIAMETERS[0] <= diameter <= tb.TINY_DIAMETERS[1]
    # sparse: the planes' foreground is near the drawn fill (at most 0.12), not the main 0.2-0.6
    foreground = np.mean([(s.masks > 0).mean() for s in samples])
    assert 0.0 < foreground < 0.15, foreground


def test_extra_sets_use_seeds_apart_from_each_other_and_from_evaluation(load_script):
    """Each extra set has 100 seeds below 1000 (evaluation) and outside 900-999 (validation)."""
    tb = load_script("train_bundled")
    starts = sorted([tb.TINY_SEEDS_FROM, tb.SMALL_SEEDS_FROM, tb.UNEVEN_SEEDS_FROM,
                     tb.DIM_SEEDS_FROM, tb.SPARSE_SEEDS_FROM])
    assert starts[0] >= 100  # the main volumes: seeds 0..
    assert all(b - a >= 100 for a, b in zip(starts, starts[1:]))
    assert starts[-1] + 100 <= 900 and min(tb.TEST_SEEDS) >= 1000
