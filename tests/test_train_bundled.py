"""scripts/train_bundled.py: the extra training sets draw their generator parameters as stated."""

import importlib
import subprocess
import sys

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


def test_real_volume_gives_every_plane_with_z_resampled_from_its_voxel_size(load_script, tmp_path):
    """--real: each YX, ZY and ZX plane holding a nucleus, Z stretched by the file's anisotropy
    (ImageJ spacing 2 um over 1 um pixels: 6 planes -> 12), each plane --real_repeat times."""
    tb = load_script("train_bundled")
    from cp3d.core.io import imwrite

    masks = np.zeros((6, 20, 24), np.uint16)
    masks[1:5, 4:12, 4:12] = 1
    masks[2:4, 12:18, 14:22] = 2
    image = (masks > 0) * 1000 + 100 + np.arange(24, dtype=np.uint16)  # a gradient: not constant
    imwrite(tmp_path / "vol.tif", image.astype(np.uint16), voxel_size=(2.0, 1.0, 1.0))
    imwrite(tmp_path / "vol_masks.tif", masks, voxel_size=(2.0, 1.0, 1.0))
    pair = (tmp_path / "vol.tif", tmp_path / "vol_masks.tif")

    once, names = tb.real_samples([pair], 2, repeat=1)
    axes = [s.source.split(":")[1][0] for s in once]
    assert axes.count("Z") == 8  # YX planes 1-4 of 6 hold a nucleus: 2-9 of 12
    assert axes.count("Y") == 14 and axes.count("X") == 16  # rows 4-17; columns 4-11, 14-21
    zy = next(s for s in once if s.source.endswith(":Y=8"))
    assert zy.masks.shape == (12, 24)  # Z resampled from 6 to 12 planes
    twice, _ = tb.real_samples([pair], 2, repeat=2)
    assert len(twice) == 2 * len(once) and "38 planes x 1" in names[0]
    # a pair given twice weighs twice, described once: "--real A --real A" at repeat 2
    four, names = tb.real_samples([pair, pair], 2, repeat=2)
    assert len(four) == 4 * len(once) and names == ["vol.tif (38 planes x 4)"]


def test_cached_volume_loads_the_same_planes_without_building_them_again(load_script, tmp_path,
                                                                         monkeypatch):
    tb = load_script("train_bundled")
    kw = dict(min_objects=1, fills=(0.05, 0.1))
    first, vols = tb.build_samples([800], 1, 2, "nuclei", cache=tmp_path, **kw)
    assert len(list(tmp_path.glob("*.pkl"))) == 1 and not list(tmp_path.glob("*.tmp"))

    def build_again(*args):
        raise AssertionError("built again")

    monkeypatch.setattr(tb, "_volume_samples", build_again)
    again, vols_again = tb.build_samples([800], 1, 2, "nuclei", cache=tmp_path, **kw)
    assert vols_again == vols and len(again) == len(first) > 0
    for a, b in zip(first, again):
        assert a.source == b.source
        for name in ("image", "masks", "flows"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # other generator options draw another volume: it is built, not taken from the cache
    with pytest.raises(AssertionError, match="built again"):
        tb.build_samples([800], 1, 2, "nuclei", cache=tmp_path, min_objects=1, fills=(0.1, 0.2))


def test_volumes_drawn_by_worker_processes_are_those_drawn_here(tmp_path, monkeypatch):
    """--workers (a GPU machine's cores): the same planes in the same order, each volume
    cached once. The workers are spawned and import the script by name, as when it is run."""
    from conftest import SCRIPTS

    monkeypatch.syspath_prepend(str(SCRIPTS))
    tb = importlib.import_module("train_bundled")
    seeds = range(tb.TINY_SEEDS_FROM, tb.TINY_SEEDS_FROM + 3)
    kw = dict(min_objects=1, diameters=tb.TINY_DIAMETERS, ranges=tb.TINY_RANGES)
    here, vols = tb.build_samples(seeds, 1, 2, "nuclei", **kw)
    apart, vols_apart = tb.build_samples(seeds, 1, 2, "nuclei", cache=tmp_path, workers=2, **kw)
    assert vols_apart == vols and [s.source for s in apart] == [s.source for s in here]
    for a, b in zip(here, apart):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.flows, b.flows)
    assert len(list(tmp_path.glob("*.pkl"))) == 3


def test_seed_ranges_refuse_evaluation_seeds_and_name_overlapping_sets(load_script):
    tb = load_script("train_bundled")
    fifth = {"main": range(96), "small": range(500, 596), "embryo-like": range(600, 664)}
    assert tb.check_seed_ranges(fifth) == []
    more_small = dict(fifth, small=range(500, 644))  # 144 small volumes run into 600..
    assert tb.check_seed_ranges(more_small) == ["the small and embryo-like sets share seeds "
                                                "600-643"]
    with pytest.raises(ValueError, match="sparse set's seeds 800-949 reach the validation"):
        tb.check_seed_ranges(dict(fifth, sparse=range(800, 950)))


def test_training_refuses_a_set_reaching_evaluation_seeds_before_drawing_any(load_script,
                                                                               tmp_path):
    tb = load_script("train_bundled")
    run = subprocess.run([sys.executable, tb.__file__, "--n_sparse", "250", "--work", str(tmp_path),
                          "--out", str(tmp_path / "m.pth"), "--minutes", "0.01"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "sparse set's seeds 800-1049" in run.stderr
    assert not (tmp_path / "m.pth").exists()


def test_calibration_takes_the_smallest_shift_within_noise_of_the_best(load_script):
    """scripts/calibrate_cellprob.py: of the thresholds within TIE of the best mean AP, the one
    nearest 0 wins, so a plateau of equal scores does not push the model further than needed."""
    cal = load_script("calibrate_cellprob")
    grid = (0.5, 0.0, -0.5, -1.0, -1.5)
    plateau = np.array([[0.80, 0.81, 0.836, 0.839, 0.840]] * 3)
    assert cal.best_threshold(plateau, grid) == -0.5  # 0.836 is within 0.005 of 0.840
    peak = np.array([[0.80, 0.81, 0.82, 0.86, 0.83]] * 3)
    assert cal.best_threshold(peak, grid) == -1.0
    flat = np.full((2, len(grid)), 0.9)
    assert cal.best_threshold(flat, grid) == 0.0
