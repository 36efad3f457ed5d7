import numpy as np

from cp3d.core.evaluate import Score, format_table, synthetic_case
from cp3d.core.metrics import average_precision, ignore_small_truth, matching_iou


def test_iou_and_ap_on_a_hand_built_case():
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1  # 16 px
    gt[6:10, 6:10] = 2  # 16 px
    gt[0:2, 8:10] = 3  # 4 px, missed
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:3] = 5  # 12 px inside object 1: IoU 0.75
    pred[6:10, 6:10] = 9  # exact
    pred[8:10, 0:2] = 4  # false positive
    iou = matching_iou(gt, pred)
    assert iou.shape == (3, 3)
    assert np.isclose(iou.max(), 1.0) and np.isclose(np.sort(iou.max(axis=1))[1], 0.75)
    ap, tp, fp, fn = average_precision(gt, pred, thresholds=(0.5, 0.8, 1.0))
    assert list(tp) == [2, 1, 1] and list(fp) == [1, 2, 2] and list(fn) == [1, 2, 2]
    assert np.allclose(ap, [2 / 4, 1 / 5, 1 / 5])


def test_matching_is_one_to_one():
    gt = np.zeros((4, 8), int)
    gt[:, :8] = 1
    pred = np.zeros((4, 8), int)
    pred[:, :4] = 1
    pred[:, 4:] = 2  # two halves: IoU 0.5 each, only one may match
    ap, tp, fp, fn = average_precision(gt, pred, thresholds=(0.5,))
    assert tp[0] == 1 and fp[0] == 1 and fn[0] == 0


def test_empty_cases():
    z = np.zeros((5, 5), int)
    assert average_precision(z, z)[0][0] == 1.0
    one = z.copy()
    one[1:3, 1:3] = 1
    assert average_precision(one, z)[0][0] == 0.0


def test_score_table_keeps_long_names_whole_and_aligned():
    long = "embryo_2026-11-30_stage16_position03_deconvolved.tif"
    rows = [Score(long, (0.9, 0.5, 0.1), 16, 17, 3.0), Score("a.tif", (0.7, 0.3, 0.0), 8, 9, 1.0)]
    lines = format_table(rows).splitlines()
    assert lines[2].startswith(long + " ")
    assert lines[2].index("0.900") == lines[3].index("0.700") > lines[0].index("AP@0.5")
    assert lines[-1].split()[1:] == ["0.800", "0.400", "0.050"]


def test_synthetic_case_takes_the_object_diameter_and_overrides_asked_for():
    vol, gt, meta, kw = synthetic_case(1200, "nuclei", {"fill": 0.05}, diameter=5.0)
    assert meta["diameter"] == 5.0 and meta["fill"] == 0.05 and kw == {}
    assert vol.shape_zyx == gt.shape and gt.max() >= 5
    assert 3.0 < meta["diameter_measured"] < 7.0  # the objects drawn are that size


def test_slivers_cut_by_the_crop_are_ignored_with_the_masks_that_cover_them():
    gt = np.zeros((3, 20, 20), int)
    gt[:, 0:8, 0:8] = 1  # 192 voxels
    gt[:, 0:8, 10:18] = 2
    gt[:, 10:18, 0:8] = 3
    gt[0, 19, 0:3] = 4  # a 3-voxel sliver of a cell cut by the crop, under 0.1 x the median
    gt[:, 10:18, 10:12] = 5  # 48 voxels: 0.25 x the median, kept
    pred = gt.copy()
    pred[gt == 4] = 7  # a mask on the sliver: ignored with it, not a false positive
    pred[gt == 5] = 0  # the kept small object missed: still a miss
    pred[:, 8, 0:8] = 1  # mask 1 a little larger than its cell
    assert average_precision(gt, pred, (0.5,))[0][0] == 4 / 5
    g, p = ignore_small_truth(gt, pred, 0.1)
    assert set(np.unique(g)) == {0, 1, 2, 3, 5} and 7 not in p and (p == 1).sum() == 216
    assert average_precision(g, p, (0.5,))[0][0] == 3 / 4
    merged = pred.copy()
    merged[gt == 4] = 3  # the sliver merged into a whole cell's mask: judged on that cell
    g, p = ignore_small_truth(gt, merged, 0.1)
    assert (p == 3).sum() == 195 and average_precision(g, p, (0.5,))[0][0] == 3 / 4
    assert ignore_small_truth(gt, pred, 0.0)[0] is gt
