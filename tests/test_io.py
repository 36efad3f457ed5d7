"""Reading tiffs in any axis order, voxel size from metadata, bad files, atomic outputs."""

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cp3d.core.errors import InputError, OutputError
from cp3d.core.io import (
    AmbiguousAxesError, Volume, atomic_write, imwrite, list_images, load_seg_npy,
    masks_to_outlines, read_volume, save_seg_npy, volume_from_array,
)


def _zcyx(seed=0, shape=(6, 2, 20, 24)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape).astype(np.uint16)


def test_reads_planes_by_y_by_x(tmp_path):
    data = _zcyx()[:, 0]
    path = tmp_path / "zyx.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    vol = read_volume(path)
    assert vol.data.shape == (6, 1, 20, 24)
    np.testing.assert_array_equal(vol.data[:, 0], data)


def test_reads_planes_channels_y_x_from_imagej_metadata(tmp_path):
    data = _zcyx()
    path = tmp_path / "zcyx.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
    vol = read_volume(path)
    assert vol.data.shape == (6, 2, 20, 24)
    np.testing.assert_array_equal(vol.data, data)
    assert vol.voxel_size == pytest.approx((2.0, 0.5, 0.5))
    assert vol.anisotropy == pytest.approx(4.0)


def test_imagej_voxel_size_in_nanometres_is_read_in_micrometres(tmp_path):
    path = tmp_path / "nm.tif"
    tifffile.imwrite(path, _zcyx()[:, 0], imagej=True, resolution=(1 / 200.0, 1 / 200.0),
                     metadata={"axes": "ZYX", "spacing": 500.0, "unit": "nm"})
    vol = read_volume(path)
    assert vol.voxel_size == pytest.approx((0.5, 0.2, 0.2))
    assert vol.anisotropy == pytest.approx(2.5)


def test_voxel_size_from_ome_metadata(tmp_path):
    data = _zcyx()[:, 0]
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(path, data, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
                               "PhysicalSizeZ": 1.0})
    vol = read_volume(path)
    assert vol.voxel_size == pytest.approx((1.0, 0.25, 0.25))
    assert vol.anisotropy == pytest.approx(4.0)


def test_three_planes_are_not_taken_for_rgb(tmp_path):
    data = _zcyx(shape=(3, 1, 30, 30))[:, 0]
    path = tmp_path / "three.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    assert read_volume(path).data.shape == (3, 1, 30, 30)


def test_any_axis_order_with_explicit_axes_and_singletons(tmp_path):
    # the example: shape (1024, 1024, 2, 105, 1), channel_axis=2, z_axis=3 (smaller here)
    zcyx = _zcyx(shape=(7, 2, 16, 18))
    data = np.transpose(zcyx, (2, 3, 1, 0))[..., np.newaxis]  # (Y, X, C, Z, 1)
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    vol = read_volume(path, z_axis=3, channel_axis=2)
    np.testing.assert_array_equal(vol.data, zcyx)


def test_ambiguous_5d_asks_for_axes(tmp_path):
    # channels first, a singleton axis in the middle: no default reading fits
    data = np.random.default_rng(0).integers(0, 100, (2, 9, 1, 16, 16)).astype(np.uint8)
    path = tmp_path / "five.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with pytest.raises(AmbiguousAxesError) as info:
        read_volume(path)
    assert "five.tif" in str(info.value)
    assert info.value.shape == (2, 9, 1, 16, 16)
    assert info.value.suggested == (1, 0)
    # answering the question reads it
    vol = read_volume(path, z_axis=1, channel_axis=0)
    assert vol.data.shape == (9, 2, 16, 16)
    np.testing.assert_array_equal(vol.data[:, 1], data[1, :, 0])


def test_2d_image_reads_as_one_plane(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, _zcyx()[0, 0], photometric="minisblack")
    vol = read_volume(path)
    assert vol.is_2d and vol.data.shape == (1, 1, 20, 24)


@pytest.mark.parametrize("problem, make, expect", [
    ("missing", lambda p: None, "file not found"),
    ("not tiff", lambda p: p.write_text("hello, I am not an image"), "not a readable TIFF"),
    ("truncated", lambda p: p.write_bytes(_tiff_bytes()[:300]), "not a readable TIFF"),
    ("nan", lambda p: tifffile.imwrite(p, _with_nan(), photometric="minisblack"), "NaN"),
    ("constant", lambda p: tifffile.imwrite(p, np.full((4, 8, 8), 7, np.uint16),
                                            photometric="minisblack"), "constant"),
    ("empty", lambda p: tifffile.imwrite(p, np.zeros((4, 8, 8), np.uint8),
                                         photometric="minisblack"), "constant"),
    ("complex", lambda p: tifffile.imwrite(p, np.ones((4, 8, 8), np.complex64)), "pixel type"),
])
def test_bad_files_give_a_message_naming_file_and_problem(tmp_path, problem, make, expect):
    path = tmp_path / f"bad_{problem.replace(' ', '_')}.tif"
    make(path)
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert path.name in message and expect in message
    assert "\n" not in message


def test_axis_out_of_range_and_same_axis(tmp_path):
    path = tmp_path / "zyx.tif"
    tifffile.imwrite(path, _zcyx()[:, 0], photometric="minisblack")
    with pytest.raises(InputError, match="z_axis=5 is out of range"):
        read_volume(path, z_axis=5)
    with pytest.raises(InputError, match="same axis"):
        read_volume(path, z_axis=0, channel_axis=0)


def _tiff_bytes():
    import io as _io

    buf = _io.BytesIO()
    tifffile.imwrite(buf, _zcyx()[:, 0], photometric="minisblack")
    return buf.getvalue()


def _with_nan():
    a = np.random.default_rng(1).random((4, 8, 8)).astype(np.float32)
    a[1, 2, 3] = np.nan
    return a


def test_masks_tif_round_trip_keeps_voxel_size(tmp_path):
    masks = np.zeros((5, 12, 12), np.uint16)
    masks[1:4, 2:6, 2:6] = 1
    masks[1:4, 6:10, 6:10] = 2
    path = imwrite(tmp_path / "m_cp_masks.tif", masks, voxel_size=(2.0, 0.5, 0.5))
    back = read_volume(path)
    np.testing.assert_array_equal(back.data[:, 0], masks)
    assert back.voxel_size == pytest.approx((2.0, 0.5, 0.5))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_uint32_masks_round_trip(tmp_path):
    masks = np.arange(5 * 8 * 8, dtype=np.uint32).reshape(5, 8, 8) + 70000
    path = imwrite(tmp_path / "big_cp_masks.tif", masks)
    np.testing.assert_array_equal(tifffile.imread(path), masks)


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "result.npy"
    target.write_bytes(b"old")

    def failing(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.npy"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(OutputError, match="not writable"):
        atomic_write(folder / "x.npy", lambda tmp: None)


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(OutputError) as info:
        atomic_write(blocker / "sub" / "x.npy", lambda tmp: None)
    assert "blocker" in str(info.value)


def test_seg_npy_has_cellpose_keys_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), np.uint16)
    masks[:, 2:8, 2:8] = 1
    masks[:, 9:14, 9:14] = 2
    dP = rng.normal(size=(3, 4, 16, 16)).astype(np.float32)
    cellprob = rng.normal(size=(4, 16, 16)).astype(np.float32)
    path = save_seg_npy(tmp_path / "img_seg.npy", masks, dP, cellprob, tmp_path / "img.tif", 17.0)
    dat = load_seg_npy(path)
    for key in ("outlines", "masks", "chan_choose", "ismanual", "filename", "flows", "diameter"):
        assert key in dat
    assert dat["masks"].dtype == np.uint16 and dat["outlines"].dtype == np.uint16
    np.testing.assert_array_equal(dat["masks"], masks)
    assert dat["ismanual"].dtype == bool and dat["ismanual"].shape == (2,)
    assert dat["filename"] == str(tmp_path / "img.tif")
    flows = dat["flows"]
    assert flows[0].shape == (4, 16, 16, 3) and flows[0].dtype == np.uint8
    assert flows[1].shape == (4, 16, 16) and flows[1].dtype == np.uint8
    assert flows[2].shape == (4, 16, 16) and flows[2].dtype == np.uint8
    assert flows[4].shape == (4, 4, 16, 16) and flows[4].dtype == np.float32
    np.testing.assert_allclose(flows[4][:3], dP)
    # outlines sit on mask borders only
    assert set(np.unique(dat["outlines"])) == {0, 1, 2}
    assert dat["outlines"][1, 4, 4] == 0 and dat["outlines"][1, 2, 4] == 1


def test_seg_npy_uses_uint32_for_many_masks(tmp_path):
    masks = (np.arange(2 * 300 * 300, dtype=np.uint32).reshape(2, 300, 300) % 70000) + 1
    path = save_seg_npy(tmp_path / "m_seg.npy", masks, None, None, "m.tif", 30.0)
    assert load_seg_npy(path)["masks"].dtype == np.uint32


def test_broken_seg_npy_is_reported(tmp_path):
    path = tmp_path / "x_seg.npy"
    path.write_bytes(b"garbage")
    with pytest.raises(InputError, match="x_seg.npy"):
        load_seg_npy(path)


def test_outlines_of_touching_masks():
    m = np.zeros((1, 6, 8), np.uint16)
    m[0, 1:5, 1:4] = 1
    m[0, 1:5, 4:7] = 2
    out = masks_to_outlines(m)
    assert out[0, 2, 3] and out[0, 2, 4]  # the shared border belongs to both
    assert not out[0, 2, 2] and not out[0, 2, 5]


def test_list_images_skips_outputs_and_filters(tmp_path):
    for name in ["a.tif", "b_cp_masks.tif", "c_masks.tif", "d.TIFF", "e.png", "f_img.tif"]:
        (tmp_path / name).write_bytes(b"")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "g.tif").write_bytes(b"")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.tif", "d.TIFF", "f_img.tif"]
    assert [p.name for p in list_images(tmp_path, img_filter="_img")] == ["f_img.tif"]
    assert "g.tif" in [p.name for p in list_images(tmp_path, look_one_level_down=True)]


def test_volume_from_array_defaults():
    vol = volume_from_array(_zcyx()[:, 0])
    assert isinstance(vol, Volume) and vol.data.shape == (6, 1, 20, 24) and vol.path is None


def _describe(v):
    if isinstance(v, np.ndarray):
        return {"type": "ndarray", "dtype": str(v.dtype), "shape": list(v.shape)}
    if isinstance(v, list):
        return {"type": "list", "items": [_describe(x) for x in v]}
    return {"type": type(v).__name__}


@pytest.mark.parametrize("ndim", ["3d", "2d"])
def test_seg_npy_matches_cellpose_layout_and_values(tmp_path, ndim):
    """Reference written by Cellpose 3.1.1.2's masks_flows_to_seg on the same arrays
    (tests/fixtures/cellpose_seg_format.json and cellpose_seg3d_ref.npz)."""
    import json

    fixtures = Path(__file__).parent / "fixtures"
    layout = json.loads((fixtures / "cellpose_seg_format.json").read_text())[ndim]
    ref = np.load(fixtures / "cellpose_seg3d_ref.npz")
    masks = np.zeros((4, 16, 16), np.uint16)
    masks[:, 2:8, 2:8] = 1
    masks[:, 9:14, 9:14] = 2
    dP, cellprob = ref["dP"], ref["cellprob"]
    if ndim == "2d":
        masks, dP, cellprob = masks[0], dP[1:, 0], cellprob[0]
    path = save_seg_npy(tmp_path / "img_seg.npy", masks, dP, cellprob, "img.tif", 17.0)
    dat = load_seg_npy(path)
    ours = {k: _describe(dat[k]) for k in layout}
    assert ours == layout
    if ndim == "3d":
        np.testing.assert_array_equal(dat["flows"][0], ref["rgb"])
        np.testing.assert_array_equal(dat["flows"][1], ref["cp"])
        np.testing.assert_array_equal(dat["flows"][2], ref["dz"])
        np.testing.assert_array_equal(dat["outlines"], ref["outlines"])


def test_outputs_get_ordinary_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = imwrite(tmp_path / "m_cp_masks.tif", np.ones((2, 4, 4), np.uint16))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
