"""scripts/make_real_embryos.py: the instance ground truth built from QCANet's mask and markers."""

import numpy as np
import pytest
import tifffile

from cp3d.core.io import read_volume


def _mask_and_markers():
    """Three mask components: one with one marker, one with two (merged nuclei), one with none."""
    mask = np.zeros((6, 30, 30), np.uint8)
    markers = np.zeros_like(mask)
    mask[1:5, 2:8, 2:8] = 255
    markers[3, 5, 5] = 255
    mask[1:5, 12:28, 12:18] = 255
    markers[3, 14, 15] = markers[3, 25, 15] = 255
    mask[1:5, 20:26, 2:8] = 255
    return mask, markers


def test_instance_labels_keeps_components_with_exactly_one_marker(load_script):
    mask, markers = _mask_and_markers()
    out = load_script("make_real_embryos").instance_labels(mask, markers)
    assert out.dtype == np.uint16 and out.max() == 1
    assert (out == 1).sum() == 4 * 6 * 6 and out[3, 5, 5] == 1
    assert out[3, 14, 15] == 0 and out[3, 22, 5] == 0


def test_script_writes_image_and_ground_truth_pairs(tmp_path, monkeypatch, load_script):
    mask, markers = _mask_and_markers()
    raw = np.random.default_rng(0).integers(0, 4000, mask.shape).astype(np.uint16)
    for stage in (8, 16):
        for folder, arr in (("images_raw", raw), ("images_nsn", mask), ("images_ndn", markers)):
            d = tmp_path / "qcanet/example_datasets" / folder
            d.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(d / f"{stage}_cell_stage.tif", arr)
    monkeypatch.setattr("sys.argv", ["make_real_embryos.py", str(tmp_path / "qcanet"),
                                     str(tmp_path / "out")])
    load_script("make_real_embryos").main()
    for stage in (8, 16):
        img = tifffile.imread(tmp_path / f"out/mouse_embryo_{stage}cell_img.tif")
        gt = tifffile.imread(tmp_path / f"out/mouse_embryo_{stage}cell_gt.tif")
        np.testing.assert_array_equal(img.reshape(raw.shape), raw)
        assert gt.reshape(mask.shape).max() == 1
        vol = read_volume(tmp_path / f"out/mouse_embryo_{stage}cell_img.tif")
        assert vol.voxel_size == pytest.approx((1.75, 0.8, 0.8), rel=1e-3)
        assert vol.anisotropy == pytest.approx(1.75 / 0.8, rel=1e-3)
