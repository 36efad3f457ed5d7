"""scripts/make_real_plant_cells.py: repairing the plant patch's misnumbered plane, splitting the
nuclei volume into a part to train on and a part held out, and the files it writes (read back
with their voxel size)."""

import numpy as np
import pytest
import tifffile

from cp3d.core.io import read_volume


def test_relink_plane_gives_each_region_the_label_above_it(load_script):
    script = load_script("make_real_plant_cells")
    labels = np.zeros((3, 10, 10), np.int64)
    labels[:, :, :5], labels[:, :, 5:] = 4, 7
    labels[1, :, :5], labels[1, :, 5:] = 900, 901  # plane 1 numbered apart
    labels[1, 0, 5:] = 900  # a stray pixel row: its region still overlaps 4 most
    out = script.relink_plane(labels, 1)
    assert set(np.unique(out[1])) == {4, 7}
    np.testing.assert_array_equal(out[[0, 2]], labels[[0, 2]])
    assert (out[1, 1:, 5:] == 7).all() and (out[1, :, :5] == 4).all()


def test_consecutive_keeps_background_and_partition(load_script):
    labels = np.array([[0, 918, 918], [5, 5, 0], [77, 0, 918]])
    out = load_script("make_real_plant_cells").consecutive(labels)
    assert out.dtype == np.uint16 and sorted(np.unique(out)) == [0, 1, 2, 3]
    np.testing.assert_array_equal(out == 0, labels == 0)
    np.testing.assert_array_equal(out[0, 1] == out[2, 2], True)


def test_write_pair_stores_the_voxel_size(tmp_path, load_script):
    raw = np.random.default_rng(0).integers(0, 255, (4, 16, 16)).astype(np.uint8)
    labels = np.ones((4, 16, 16), np.uint16)
    load_script("make_real_plant_cells").write_pair(tmp_path, "plant_ovule", raw, labels,
                                                    (0.235, 0.15, 0.15))
    vol = read_volume(tmp_path / "plant_ovule_img.tif")
    np.testing.assert_array_equal(vol.data[:, 0], raw)
    assert vol.anisotropy == pytest.approx(0.235 / 0.15, rel=1e-3)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "plant_ovule_gt.tif"), labels)


def test_write_pair_without_voxel_size_keeps_planes_as_z(tmp_path, load_script):
    raw = np.random.default_rng(0).integers(0, 255, (64, 20, 20)).astype(np.uint16)
    load_script("make_real_plant_cells").write_pair(tmp_path, "plant_patch", raw,
                                                    np.ones(raw.shape, np.uint16), None)
    vol = read_volume(tmp_path / "plant_patch_img.tif")
    assert vol.data.shape == (64, 1, 20, 20) and not vol.is_2d


def test_split_x_shares_no_voxel_and_renumbers_each_half(load_script):
    raw = np.arange(2 * 4 * 10).reshape(2, 4, 10)
    labels = np.zeros((2, 4, 10), np.int64)
    labels[:, :2, 1:3], labels[:, 2:, 3:8], labels[:, :2, 7:9] = 40, 12, 977  # 12 is cut at 5
    (raw_a, lab_a), (raw_b, lab_b) = load_script("make_real_plant_cells").split_x(raw, labels, 5)
    np.testing.assert_array_equal(np.concatenate([raw_a, raw_b], axis=-1), raw)
    assert lab_a.shape == (2, 4, 5) and lab_b.shape == (2, 4, 5)
    assert sorted(np.unique(lab_a)) == [0, 1, 2] and sorted(np.unique(lab_b)) == [0, 1, 2]
    np.testing.assert_array_equal(np.concatenate([lab_a, lab_b], axis=-1) > 0, labels > 0)
