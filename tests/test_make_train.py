"""``cp3d-cli make-train``: random crops in YX, ZY and ZX (Z resampled by the anisotropy) with
matching mask crops, named by where they came from; a folder with a bad file goes on; ``cp3d-cli
train`` reads the crops folder; and the whole loop, crops -> labels -> fine-tuning, raises the
validation AP of a network on a style it did not know."""

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cp3d.core import cli
from cp3d.core.errors import InputError
from cp3d.core.inference import resize_volume
from cp3d.core.io import read_volume
from cp3d.core.make_train import (Crop, find_masks, make_train_file, random_crops, relabel,
                                  resample_rows)
from cp3d.core.normalize import normalize_volume
from cp3d.core.synth import cells_labels, downsample_z, nuclei_labels, render, render_nuclei

TINY = [2, 8, 16, 32]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def stack():
    """12 planes, anisotropy 2: nuclei labels on the anisotropic grid and their image."""
    labels = nuclei_labels((12, 40, 56), 30, (4.0, 6.0), anisotropy=2.0, seed=5)
    return render_nuclei(labels, seed=5, anisotropy=2.0), labels


def _same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal partitions: one-to-one label correspondence, background to background."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
            and np.all((pairs[0] == 0) == (pairs[1] == 0)))


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- arrays


def test_crops_in_three_orientations_with_z_resampled(stack):
    image, labels = stack
    vol = normalize_volume(image[np.newaxis])
    crops = random_crops(vol, labels, anisotropy=2.0, nimg_per_tif=4, crop_size=32,
                         rng=np.random.default_rng(0))
    assert [c.index for c in crops] == list(range(12))
    assert [c.orientation for c in crops] == ["yx"] * 4 + ["zy"] * 4 + ["zx"] * 4
    for c in crops:
        # 12 planes at anisotropy 2 -> 24 rows, like an XY plane; 32 px crops elsewhere
        rows = 32 if c.orientation == "yx" else 24
        assert c.image.shape == (1, rows, 32) and c.image.dtype == np.float32
        assert c.masks.shape == (rows, 32)
    for orientation, n in (("yx", 12), ("zy", 56), ("zx", 40)):  # distinct planes, in range
        planes = [c.plane for c in crops if c.orientation == orientation]
        assert len(set(planes)) == 4 and max(planes) < n
    # a volume smaller than crop_size gives whole planes
    big = random_crops(vol, None, 2.0, 2, 512, np.random.default_rng(0))
    assert [c.image.shape[1:] for c in big] == [(40, 56)] * 2 + [(24, 40)] * 2 + [(24, 56)] * 2
    assert all(c.masks is None and c.y0 == c.x0 == 0 for c in big)
    # a 2D image (one plane) gives YX crops only; more crops than planes repeat planes
    flat = random_crops(vol[:, :1], labels[:1], 2.0, 3, 16, np.random.default_rng(0))
    assert [c.orientation for c in flat] == ["yx"] * 3 and {c.plane for c in flat} == {0}


def test_crops_match_volume_and_ground_truth_cut_the_same_way(stack):
    image, labels = stack
    vol = normalize_volume(image[np.newaxis])
    crops = random_crops(vol, labels, 2.0, 5, 24, np.random.default_rng(1))
    tall_labels = np.repeat(labels, 2, axis=0)  # nearest-neighbour Z x 2, pixel centres aligned
    tall_image = resize_volume(vol, (24, 40, 56))  # inference's own Z upsampling
    for c in crops:
        h, w = c.masks.shape
        box = (slice(c.y0, c.y0 + h), slice(c.x0, c.x0 + w))
        if c.orientation == "yx":
            want_m, want_i = labels[c.plane][box], vol[0, c.plane][box]
        elif c.orientation == "zy":
            want_m, want_i = tall_labels[:, :, c.plane][box], tall_image[0, :, :, c.plane][box]
        else:
            want_m, want_i = tall_labels[:, c.plane][box], tall_image[0, :, c.plane][box]
        assert _same_up_to_relabelling(c.masks, want_m), c.name("v")
        np.testing.assert_allclose(c.image[0], want_i, atol=1e-5)
        n = len(np.unique(want_m[want_m > 0]))
        assert set(np.unique(c.masks)) - {0} == set(range(1, n + 1))  # consecutive 1..N


def test_resampling_and_relabelling_helpers():
    plane = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)  # rows 0-1, 2-3, 4-5
    np.testing.assert_array_equal(resample_rows(plane, 6, order=0), np.repeat(plane, 2, 0))
    up = resample_rows(plane, 6, order=1)
    assert up.shape == (6, 2) and up[0, 0] == 0 and up[-1, 0] == 4 and up[1, 0] == 0.5
    assert relabel(np.array([[0, 7], [70000, 7]])).tolist() == [[0, 1], [2, 1]]
    assert relabel(np.array([[3, 5]])).tolist() == [[1, 2]]  # no background: labels from 1
    c = Crop(np.zeros((1, 2, 2), np.float32), None, "zy", 41, 0, 0, 3)
    assert c.name("embryo") == "embryo_zy_x0041_crop3"


# --------------------------------------------------------------------------- files


def test_file_crops_names_masks_and_seed(stack, tmp_path):
    image, labels = stack
    tifffile.imwrite(tmp_path / "emb.tif", image)
    assert find_masks(tmp_path / "emb.tif") is None
    tifffile.imwrite(tmp_path / "emb_cp_masks.tif", labels.astype(np.uint16))
    assert find_masks(tmp_path / "emb.tif").name == "emb_cp_masks.tif"
    written = make_train_file(tmp_path / "emb.tif", anisotropy=2.0, nimg_per_tif=3,
                              crop_size=32, seed=4)
    out = tmp_path / "train"
    assert all(p.parent == out for p in written)
    images = [n for n in _names(out) if not n.endswith("_masks.tif")]
    assert len(images) == 9 and not [n for n in _names(out) if n.startswith(".")]
    for k in range(9):
        (name,) = [n for n in images if n.endswith(f"_crop{k}.tif")]
        orientation, plane = name.split("_")[1:3]
        assert orientation == ("yx", "zy", "zx")[k // 3]
        assert plane[0] == {"yx": "z", "zy": "x", "zx": "y"}[orientation] and len(plane) == 5
        img = read_volume(out / name)
        assert img.data.shape == (1, 1, 24 if orientation != "yx" else 32, 32)
        assert img.data.dtype == np.float32
        masks = tifffile.imread(out / name.replace(".tif", "_masks.tif"))
        assert masks.shape == img.data.shape[2:] and masks.max() > 0
        # the mask crop is the ground truth cut where the name says
        sl = {"yx": np.s_[int(plane[1:])], "zy": np.s_[:, :, int(plane[1:])],
              "zx": np.s_[:, int(plane[1:])]}[orientation]
        source = (labels if orientation == "yx" else np.repeat(labels, 2, axis=0))[sl]
        assert set(np.unique(masks)) - {0} <= set(range(1, len(np.unique(source)) + 1))
    # the same seed gives the same crops; another seed others
    again = make_train_file(tmp_path / "emb.tif", tmp_path / "again", anisotropy=2.0,
                            nimg_per_tif=3, crop_size=32, seed=4)
    assert [p.name for p in again] == [p.name for p in written]
    np.testing.assert_array_equal(tifffile.imread(again[0]), tifffile.imread(written[0]))
    other = make_train_file(tmp_path / "emb.tif", tmp_path / "other", anisotropy=2.0,
                            nimg_per_tif=3, crop_size=32, seed=5)
    assert [p.name for p in other] != [p.name for p in written]


def test_two_channels_seg_npy_masks_and_metadata_anisotropy(stack, tmp_path):
    image, labels = stack
    two = np.stack([image, image[:, ::-1]], axis=1)  # (Z, C, Y, X)
    tifffile.imwrite(tmp_path / "two.tif", two, imagej=True, metadata={"axes": "ZCYX",
                     "spacing": 2.0, "unit": "um"}, resolution=(1.0, 1.0))
    np.save(tmp_path / "two_seg.npy", {"masks": labels.astype(np.uint16)}, allow_pickle=True)
    written = make_train_file(tmp_path / "two.tif", nimg_per_tif=1, crop_size=64, chan=1,
                              chan2=2, invert=True)
    zy = next(p for p in written if "_zy_" in p.name and not p.stem.endswith("_masks"))
    vol = read_volume(zy)  # CYX tiff: 2 channels, 1 plane; Z doubled from the voxel size
    assert vol.data.shape == (1, 2, 24, 40) and tifffile.imread(zy.with_name(
        zy.stem + "_masks.tif")).shape == (24, 40)
    assert len(written) == 6  # 3 crops, each with masks from _seg.npy


def test_bad_masks_are_refused_by_name(stack, tmp_path):
    image, labels = stack
    tifffile.imwrite(tmp_path / "a.tif", image)
    tifffile.imwrite(tmp_path / "a_masks.tif", labels[:5].astype(np.uint16))
    with pytest.raises(InputError, match=r"a_masks\.tif: mask shape"):
        make_train_file(tmp_path / "a.tif")
    tifffile.imwrite(tmp_path / "a_masks.tif", labels.astype(np.float32) + 0.5)
    with pytest.raises(InputError, match=r"a_masks\.tif: masks are not integer labels"):
        make_train_file(tmp_path / "a.tif")
    assert not (tmp_path / "train").exists()  # nothing written for a refused file


def test_cli_folder_with_bad_file_goes_on(stack, tmp_path, capsys):
    image, labels = stack
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    tifffile.imwrite(data / "a.tif", image)
    tifffile.imwrite(data / "a_masks.tif", labels.astype(np.uint16))
    (data / "broken.tif").write_bytes(b"not a tiff at all")
    tifffile.imwrite(data / "sub" / "a.tif", image[:6])  # same name one level down
    tifffile.imwrite(data / "sub" / "b.tif", np.zeros((4, 20, 20), np.uint16),
                     photometric="minisblack")  # constant
    argv = ["make-train", "--dir", str(data), "--look_one_level_down", "--nimg_per_tif", "2",
            "--crop_size", "16", "--anisotropy", "2"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "broken.tif: not a readable TIFF" in err and "b.tif: image is constant" in err
    assert "2 file(s) failed" in err
    names = _names(data / "train")
    crops = [n for n in names if not n.endswith("_masks.tif")]
    masks = [n for n in names if n.endswith("_masks.tif")]
    assert len([n for n in crops if n.startswith("data_a_")]) == 6  # same stems: folder prefix
    assert len([n for n in crops if n.startswith("sub_a_")]) == 6
    assert masks and all(n.startswith("data_a_") and n.replace("_masks", "") in crops
                         for n in masks)  # only data/a.tif has masks
    # a second run does not crop the crops in train/ (a subfolder of --dir)
    assert cli.main(argv) == 1
    assert _names(data / "train") == names
    # usage errors
    with pytest.raises(SystemExit) as info:
        cli.main(["make-train", "--dir", str(data), "--crop_size", "0"])
    assert info.value.code == 2
    assert cli.main(["make-train", "--image_path", str(data / "nope.tif")]) == 1
    assert "nope.tif: file not found" in capsys.readouterr().err


def test_train_command_reads_the_crops_folder(stack, tmp_path, monkeypatch, capsys):
    from cp3d.core.models import save_model
    from cp3d.core.net import CPnet
    from cp3d.core.train_cli import find_training_pairs, read_pairs

    image, labels = stack
    tifffile.imwrite(tmp_path / "v.tif", image)
    tifffile.imwrite(tmp_path / "v_masks.tif", labels.astype(np.uint16))
    assert cli.main(["make-train", "--image_path", str(tmp_path / "v.tif"), "--anisotropy",
                     "2", "--nimg_per_tif", "2", "--crop_size", "32"]) == 0
    pairs = find_training_pairs(tmp_path / "train")  # default mask_filter _masks
    assert len(pairs) == 6
    for pair in read_pairs(pairs):  # 2D crops as 1-plane volumes
        assert pair.image.shape[:2] == (1, 1) and pair.masks.shape == (1, *pair.image.shape[2:])
    users = tmp_path / "models"
    monkeypatch.setenv("CP3D_USER_MODELS", str(users))
    torch.manual_seed(0)
    save_model(CPnet(TINY, 3, 3, diam_mean=10.0), tmp_path / "tiny.pth")
    assert cli.main(["train", "--dir", str(tmp_path / "train"), "--pretrained_model",
                     str(tmp_path / "tiny.pth"), "--n_epochs", "1", "--batch_size", "2",
                     "--bsize", "32", "--min_train_masks", "1", "--model_name_out", "crops"]) == 0
    assert "6 training image(s)" in capsys.readouterr().out
    assert (users / "crops.pth").exists()


# --------------------------------------------------------------------------- the whole loop


def test_crops_labels_fine_tune_raises_validation_ap(tmp_path):
    """crops -> labels -> train -> validation AP rises.

    A tiny CPnet (nbase 2-8-16-32) is trained briefly on make-train crops of a nuclei volume:
    the base model. Membrane-stained packed cells (bright boundaries, dark interiors) are a style
    it never saw. make-train cuts 64 px crops (YX, ZY, ZX; anisotropy 2) from two membrane
    volumes whose ground truth lies beside them as NAME_masks.tif (the "labels" a user would
    correct); the crops of one volume fine-tune the base for 200 steps, those of the other
    validate. AP@0.5 = mean over the 24 validation crops, each segmented in 2D.

    Figures (2 busy CPU cores, one thread; this test ~22 s, the whole file ~30 s): base on its
    own nuclei YX crops 0.415; on the membrane validation crops base 0.002, fine-tuned 0.418.
    Seeds 1-4 for volumes, initialisation and training, and float32 instead of bfloat16
    training (seeds 0 and 4): base 0.002-0.005, fine-tuned 0.36-0.41.
    """
    from cp3d.core.metrics import average_precision
    from cp3d.core.models import load_model, save_model
    from cp3d.core.net import CPnet
    from cp3d.core.pipeline import segment
    from cp3d.core.samples import median_diameter
    from cp3d.core.train import train_model
    from cp3d.core.train_cli import find_training_pairs, read_pairs

    a, diameter, crop = 2.0, 14.0, 64
    t0 = time.perf_counter()
    for folder in ("nuclei", "membrane"):
        (tmp_path / folder).mkdir()
    nl = nuclei_labels((48, 96, 96), 90, (diameter / 2 * 0.85, diameter / 2 * 1.15), seed=11)
    tifffile.imwrite(tmp_path / "nuclei" / "n.tif",
                     render(nl, "nuclei", seed=11, anisotropy=a, dtype=np.uint16))
    tifffile.imwrite(tmp_path / "nuclei" / "n_masks.tif", downsample_z(nl, a, 0).astype(np.uint16))
    for name, seed in (("fit", 21), ("val", 22)):
        cl = cells_labels((48, 96, 96), diameter, seed=seed)
        tifffile.imwrite(tmp_path / "membrane" / f"{name}.tif",
                         render(cl, "membrane", seed=seed, anisotropy=a, dtype=np.uint16))
        tifffile.imwrite(tmp_path / "membrane" / f"{name}_masks.tif",
                         downsample_z(cl, a, 0).astype(np.uint16))
    for folder in ("nuclei", "membrane"):
        assert cli.main(["make-train", "--dir", str(tmp_path / folder), "--anisotropy", str(a),
                         "--nimg_per_tif", "8", "--crop_size", str(crop)]) == 0
    nuclei = read_pairs(find_training_pairs(tmp_path / "nuclei" / "train"))
    membrane = read_pairs(find_training_pairs(tmp_path / "membrane" / "train"))
    fit = [p for p in membrane if Path(p.source).name.startswith("fit_")]
    val = [p for p in membrane if Path(p.source).name.startswith("val_")]
    assert len(nuclei) == len(fit) == len(val) == 24

    kw = dict(n_per_axis=None, min_train_masks=1, evaluate_ap=False, learning_rate=0.01,
              batch_size=8, nimg_per_epoch=32, bsize=crop, seed=0)
    torch.manual_seed(0)
    save_model(CPnet(TINY, 3, 3, diam_mean=diameter), tmp_path / "init.pth")
    base = train_model(nuclei, save_path=tmp_path / "base.pth",
                       pretrained_model=tmp_path / "init.pth", n_epochs=15, **kw)
    t1 = time.perf_counter()
    tuned = train_model(fit, save_path=tmp_path / "tuned.pth",
                        pretrained_model=base.model_path, n_epochs=50, **kw)
    t2 = time.perf_counter()

    def mean_ap(model_path, pairs) -> float:
        """AP@0.5 per crop, averaged; crops of one shape segmented as one stack of planes."""
        model = load_model(model_path)
        diam = float(np.mean([median_diameter(p.masks[0]) for p in pairs]))
        aps = []
        for shape in sorted({p.masks.shape for p in pairs}):
            group = [p for p in pairs if p.masks.shape == shape]
            out = segment(np.concatenate([p.image for p in group]), model, do_3D=False,
                          diameter=diam)
            aps += [average_precision(p.masks[0], m)[0][0] for p, m in zip(group, out.masks)]
        return float(np.mean(aps))

    base_own = mean_ap(base.model_path, [p for p in nuclei if "_yx_" in p.source])
    base_ap = mean_ap(base.model_path, val)
    tuned_ap = mean_ap(tuned.model_path, val)
    t3 = time.perf_counter()
    print(f"seconds: data and crops {t1 - t0 - base.seconds:.0f}, base training "
          f"{base.seconds:.0f}, fine-tuning {t2 - t1:.0f}, evaluation {t3 - t2:.0f}")
    print(f"AP@0.5: base on nuclei crops {base_own:.3f}; on membrane validation crops: "
          f"base {base_ap:.3f}, fine-tuned {tuned_ap:.3f}")
    assert base_own > base_ap + 0.1  # the base knows nuclei better...
    assert base_ap < 0.1  # ...that fails on membrane-stained cells
    assert tuned_ap > 0.25 and tuned_ap > base_ap + 0.2
