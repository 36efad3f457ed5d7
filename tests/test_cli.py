"""cp3d-cli as a user runs it: a folder with a bad file, outputs read back, every flag in --help."""

import numpy as np
import pytest
import tifffile
import torch

from cp3d.core import cli
from cp3d.core.io import load_seg_npy

FLAGS = ["--image_path", "--dir", "--look_one_level_down", "--img_filter", "--z_axis",
         "--channel_axis", "--chan", "--chan2", "--do_3D", "--stitch_threshold", "--anisotropy",
         "--diameter", "--flow3D_smooth", "--min_size", "--cellprob_threshold", "--niter",
         "--pretrained_model", "--use_gpu", "--batch_size", "--savedir", "--save_tif",
         "--no_npy", "--verbose", "--invert", "--all_channels", "--sharpen_radius", "--tile_norm",
         "--augment"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from cp3d.core.models import save_model
    from cp3d.core.net import CPnet

    torch.manual_seed(0)
    net = CPnet([2, 8, 16, 32], 3, 3)
    path = tmp_path_factory.mktemp("models") / "tiny.pth"
    save_model(net, path)
    return path


def _stack(path, seed=0, shape=(8, 40, 40)):
    rng = np.random.default_rng(seed)
    tifffile.imwrite(path, rng.integers(0, 1000, shape).astype(np.uint16),
                     photometric="minisblack")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text, flag


def test_batch_goes_past_a_bad_file_and_reports_it(tmp_path, tiny_model, capsys):
    _stack(tmp_path / "good.tif")
    (tmp_path / "broken.tif").write_bytes(b"this is not a tiff")
    code = cli.main(["--dir", str(tmp_path), "--pretrained_model", str(tiny_model),
                     "--diameter", "30"])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.tif" in err and "not a readable TIFF" in err
    assert "segmented 1 of 2" in err
    assert "\r" not in err  # not a terminal: no progress bar redraws, one line per file
    assert f"{tmp_path / 'good.tif'}: " in err and " masks, diameter 30.0 px" in err
    masks = tifffile.imread(tmp_path / "good_cp_masks.tif")
    assert masks.shape == (8, 40, 40)
    dat = load_seg_npy(tmp_path / "good_seg.npy")
    np.testing.assert_array_equal(dat["masks"], masks)
    assert not (tmp_path / "broken_cp_masks.tif").exists()


def test_savedir_and_no_npy(tmp_path, tiny_model):
    _stack(tmp_path / "a.tif")
    out = tmp_path / "results"
    code = cli.main(["--image_path", str(tmp_path / "a.tif"), "--pretrained_model",
                     str(tiny_model), "--savedir", str(out), "--no_npy"])
    assert code == 0
    assert (out / "a_cp_masks.tif").exists() and not (out / "a_seg.npy").exists()


def test_missing_model_is_named(tmp_path, capsys):
    _stack(tmp_path / "a.tif")
    code = cli.main(["--image_path", str(tmp_path / "a.tif"), "--pretrained_model",
                     str(tmp_path / "nope.pth")])
    assert code == 1
    assert "nope.pth" in capsys.readouterr().err


def test_savedir_that_is_a_file_is_refused(tmp_path, tiny_model, capsys):
    _stack(tmp_path / "a.tif")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli.main(["--image_path", str(tmp_path / "a.tif"), "--pretrained_model",
                     str(tiny_model), "--savedir", str(blocker)])
    assert code == 1
    assert "file" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["--image_path", "x.tif", "--flow3D_smooth", "1,2"])
    assert info.value.code == 2


def test_augment_flag_reaches_the_pipeline_and_the_seg_file(tmp_path, tiny_model):
    _stack(tmp_path / "a.tif")
    args = ["--image_path", str(tmp_path / "a.tif"), "--pretrained_model", str(tiny_model),
            "--diameter", "30", "--cellprob_threshold", "-8"]
    assert cli.main(args) == 0
    plain = load_seg_npy(tmp_path / "a_seg.npy")
    assert cli.main(args + ["--augment"]) == 0
    dat = load_seg_npy(tmp_path / "a_seg.npy")
    assert dat["cp3d_params"]["augment"] is True and plain["cp3d_params"]["augment"] is False
    # a random network is not flip-equivariant: averaging its flipped predictions changes them
    assert not np.allclose(dat["flows"][4], plain["flows"][4])


def test_bundled_sample_with_no_other_flag_gives_sensible_masks(tmp_path):
    """What the README's first command does: the bundled model, diameter estimated."""
    import shutil

    from cp3d.core.metrics import average_precision
    from cp3d.resources import SAMPLE_DIR

    image = shutil.copy(SAMPLE_DIR / "sample_nuclei.tif", tmp_path)
    gt = tifffile.imread(SAMPLE_DIR / "sample_nuclei_masks.tif")
    assert cli.main(["--image_path", str(image), "--do_3D"]) == 0
    masks = tifffile.imread(tmp_path / "sample_nuclei_cp_masks.tif")
    n, n_true = len(np.unique(masks)) - 1, int(gt.max())
    ap = average_precision(gt, masks, thresholds=(0.5,))[0][0]
    print(f"sample: {n} masks for {n_true} nuclei, AP@0.5 {ap:.3f}")
    assert 0.85 * n_true <= n <= 1.15 * n_true
    assert ap >= 0.8


def test_bundled_cells_model_by_name_segments_membrane_stained_cells(tmp_path, capsys):
    """``--pretrained_model cp3d_cyto`` picks the bundled cells model: on a fresh volume of
    packed membrane-stained cells (a seed no model was trained on) it finds the cells, which
    the nuclei model cannot (AP@0.5 0.000 on this volume, measured)."""
    from cp3d.core.metrics import average_precision
    from cp3d.core.synth import random_volume

    img, gt, _ = random_volume(3000, "cells", shape=(24, 96, 96), diameter=20.0,
                               anisotropy=2.0, style="membrane", dtype=np.uint16)
    image = tmp_path / "cells.tif"
    tifffile.imwrite(image, img, photometric="minisblack")
    assert cli.main(["models"]) == 0
    assert "cp3d_cyto" in capsys.readouterr().out
    assert cli.main(["--image_path", str(image), "--pretrained_model", "cp3d_cyto",
                     "--diameter", "20", "--anisotropy", "2"]) == 0
    masks = tifffile.imread(tmp_path / "cells_cp_masks.tif")
    ap = average_precision(gt, masks, thresholds=(0.5, 0.75))[0]
    print(f"cells: {len(np.unique(masks)) - 1} masks for {int(gt.max())} cells, AP {ap}")
    assert ap[0] >= 0.9 and ap[1] >= 0.7


def test_eval_scores_a_labelled_crop_and_can_leave_out_the_cells_it_cuts(tmp_path, capsys):
    """`cp3d-cli eval` on a crop of the bundled sample and its ground truth: the table, and with
    --ignore_small the nuclei cut by the crop's faces left out (fewer, no worse AP)."""
    from cp3d.core.io import read_volume
    from cp3d.resources import SAMPLE_DIR

    vol = read_volume(SAMPLE_DIR / "sample_nuclei.tif")
    crop = np.s_[:, :64, 40:104]  # cuts 6 of its 41 nuclei to under 0.1 x the median volume
    gt = tifffile.imread(SAMPLE_DIR / "sample_nuclei_masks.tif")[crop]
    tifffile.imwrite(tmp_path / "crop.tif", vol.data[:, 0][crop])
    tifffile.imwrite(tmp_path / "crop_masks.tif", gt)
    tifffile.imwrite(tmp_path / "unlabelled.tif", vol.data[:, 0, :8, :8])  # no _masks: skipped
    args = ["eval", "--dir", str(tmp_path), "--pretrained_model", "cp3d_nuclei_fast",
            "--diameter", "20", "--anisotropy", str(vol.anisotropy or 1.0)]
    rows = {}
    for extra in ([], ["--ignore_small", "0.1"]):
        assert cli.main(args + extra) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[:4] == ["volume", "AP@0.5", "AP@0.75", "AP@0.9"]
        assert len(lines) == 3 and lines[2].split()[0] == "crop.tif"
        rows[tuple(extra)] = [float(v) for v in lines[2].split()[1:6]]
    n_true = len(np.unique(gt)) - 1
    whole = rows[("--ignore_small", "0.1")]
    assert rows[()][3] == n_true and rows[()][0] >= 0.85
    assert whole[3] == n_true - 6 and whole[0] >= rows[()][0]
    assert cli.main(["eval", "--dir", str(tmp_path / "nothing_here")]) == 1
    assert "nothing_here" in capsys.readouterr().err


def test_a_single_plane_is_segmented_in_2d_unless_3d_is_asked_for(tmp_path, tiny_model, capsys,
                                                                  caplog):
    """A folder may mix 2D images and stacks: by default a plane is segmented in 2D (and the log
    says so); with --do_3D it is refused, by name, and the batch goes on. A plane whose ImageJ
    metadata gives it 64 channels gets a hint that they may be Z planes."""
    _stack(tmp_path / "stack.tif")
    _stack(tmp_path / "plane.tif", seed=1, shape=(40, 40))
    tifffile.imwrite(tmp_path / "channels.tif",
                     np.random.default_rng(2).integers(0, 1000, (64, 40, 40)).astype(np.uint16),
                     imagej=True, metadata={"axes": "CYX"})
    common = ["--dir", str(tmp_path), "--pretrained_model", str(tiny_model), "--diameter", "30"]

    with caplog.at_level("WARNING", logger="cp3d"):
        assert cli.main(common) == 0
    assert "plane.tif: a single plane: segmenting it in 2D" in caplog.text
    assert "channels.tif: a single plane: segmenting it in 2D; its 64 channels may be Z" \
        in caplog.text
    assert tifffile.imread(tmp_path / "plane_cp_masks.tif").shape == (40, 40)
    assert "segmented 3 of 3" in capsys.readouterr().err

    for f in tmp_path.glob("*_cp_masks.tif"):
        f.unlink()
    assert cli.main(common + ["--do_3D"]) == 1
    err = capsys.readouterr().err
    assert "segmented 1 of 3" in err and (tmp_path / "stack_cp_masks.tif").exists()
    assert f"{tmp_path / 'plane.tif'}: 2D image (a single plane) given to 3D" in err
    assert "channels.tif: 2D image (a single plane) given to 3D segmentation; segment it in " \
           "2D (do_3D=False; in cp3d-cli, leave out --do_3D); its 64 channels may be Z" in err
    assert not (tmp_path / "plane_cp_masks.tif").exists()
