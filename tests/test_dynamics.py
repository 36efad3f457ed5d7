"""Flows from masks and masks from flows: ideal flows must give the ground truth back."""

import numpy as np
import pytest

from cp3d.core.dynamics import fill_holes_and_remove_small_masks, masks_from_flows
from cp3d.core.flows import masks_to_flows
from cp3d.core.metrics import average_precision
from cp3d.core.stitch import stitch3D
from cp3d.core.synth import nuclei_labels


@pytest.fixture(scope="module")
def touching():
    gt = nuclei_labels((48, 96, 96), 400, (4.0, 8.0), seed=1)
    return gt, masks_to_flows(gt)


def _cellprob(gt):
    return np.where(gt > 0, 8.0, -8.0).astype(np.float32)


def test_hundreds_of_touching_nuclei_from_ideal_flows(touching):
    gt, flows = touching
    assert gt.max() >= 300
    # they really touch: many voxels have a neighbour of another label
    shifted = gt[:, :, 1:] != gt[:, :, :-1]
    assert np.count_nonzero(shifted & (gt[:, :, 1:] > 0) & (gt[:, :, :-1] > 0)) > 1000
    masks = masks_from_flows(5 * flows, _cellprob(gt))
    ap, *_ = average_precision(gt, masks, thresholds=(0.5, 0.9))
    assert ap[0] >= 0.99 and ap[1] >= 0.95, ap


def test_flows_are_unit_vectors_pointing_inwards(touching):
    gt, flows = touching
    norm = np.sqrt((flows**2).sum(0))
    assert np.allclose(norm[gt > 0], 1.0, atol=1e-4)
    assert np.all(norm[gt == 0] == 0)
    # on average a step along the flow moves towards the object's centre of mass
    z, y, x = np.nonzero(gt == 5)
    centre = np.array([z.mean(), y.mean(), x.mean()])
    to_centre = centre[:, None] - np.stack([z, y, x])
    dots = (flows[:, z, y, x] * to_centre).sum(0)
    assert (dots > 0).mean() > 0.9


def test_2d_round_trip():
    gt = nuclei_labels((1, 128, 128), 60, (6.0, 11.0), seed=2)[0]
    flows = masks_to_flows(gt)
    assert flows.shape == (2, 128, 128)
    masks = masks_from_flows(5 * flows, _cellprob(gt))
    ap, *_ = average_precision(gt, masks, thresholds=(0.5, 0.9))
    assert masks.ndim == 2 and ap[0] >= 0.99 and ap[1] >= 0.95, ap


def test_axis_permutation_gives_identical_masks(touching):
    gt, flows = touching
    cp = _cellprob(gt)
    ref = masks_from_flows(5 * flows, cp)
    order = (2, 0, 1)  # the volume as (X, Z, Y)
    dP_perm = np.stack([flows[a] for a in order]).transpose(0, *(a + 1 for a in order))
    perm = masks_from_flows(5 * dP_perm, cp.transpose(order))
    back = perm.transpose(np.argsort(order))
    ap, *_ = average_precision(ref, back, thresholds=(0.99,))
    assert ap[0] == 1.0


def test_flow3D_smooth_scalar_and_per_axis(touching):
    gt, flows = touching
    rng = np.random.default_rng(0)
    noisy = 5 * flows + rng.normal(0, 2.0, flows.shape).astype(np.float32)
    cp = _cellprob(gt)
    rough = average_precision(gt, masks_from_flows(noisy, cp), (0.5,))[0][0]
    smooth = average_precision(gt, masks_from_flows(noisy, cp, flow3D_smooth=1.0), (0.5,))[0][0]
    per_axis = average_precision(gt, masks_from_flows(noisy, cp, flow3D_smooth=[1.0, 0.5, 0.5]),
                                 (0.5,))[0][0]
    assert smooth >= rough and smooth > 0.9 and per_axis > 0.9, (rough, smooth, per_axis)


def test_min_size_and_empty_input():
    gt = np.zeros((10, 30, 30), np.uint16)
    gt[2:8, 5:15, 5:15] = 1  # 600 voxels
    gt[4:6, 20:23, 20:23] = 2  # 18 voxels
    flows = masks_to_flows(gt)
    masks = masks_from_flows(5 * flows, _cellprob(gt), min_size=20)
    assert masks.max() == 1 and (masks > 0).sum() == 600
    kept = masks_from_flows(5 * flows, _cellprob(gt), min_size=10)
    assert kept.max() == 2
    empty = masks_from_flows(np.zeros((3, 10, 30, 30), np.float32),
                             np.full((10, 30, 30), -5, np.float32))
    assert empty.shape == (10, 30, 30) and empty.max() == 0


def test_cellprob_threshold_controls_what_is_followed(touching):
    gt, flows = touching
    cp = np.where(gt > 0, 1.0, -8.0).astype(np.float32)
    assert masks_from_flows(5 * flows, cp, cellprob_threshold=2.0).max() == 0
    assert masks_from_flows(5 * flows, cp, cellprob_threshold=0.0).max() > 300


def test_holes_are_filled_and_labels_renumbered():
    m = np.zeros((3, 20, 20), np.int32)
    m[:, 2:12, 2:12] = 7
    m[1, 6, 6] = 0  # a hole
    m[:, 14:18, 14:18] = 9
    out = fill_holes_and_remove_small_masks(m, min_size=0)
    assert out.dtype == np.uint16 and set(np.unique(out)) == {0, 1, 2}
    assert out[1, 6, 6] == 1


def test_more_than_65535_masks_give_uint32():
    m = np.arange(1, 70001, dtype=np.int64).reshape(1, 100, 700).repeat(2, axis=0)
    out = fill_holes_and_remove_small_masks(m, min_size=0, fill=False)
    assert out.dtype == np.uint32 and out.max() == 70000


def test_stitch_links_planes_of_3d_objects():
    gt = nuclei_labels((24, 64, 64), 40, (5.0, 8.0), seed=3, touching=1.1)
    rng = np.random.default_rng(0)
    planes = np.zeros_like(gt, dtype=np.int64)
    for z in range(gt.shape[0]):  # independent 2D labels per plane, shuffled ids
        ids = np.unique(gt[z])
        ids = ids[ids > 0]
        lut = np.zeros(int(gt.max()) + 1, np.int64)
        lut[ids] = rng.permutation(len(ids)) + 1
        planes[z] = lut[gt[z]]
    # min_size applies per plane in stitch mode (Cellpose's rule): tiny polar caps go first
    planes = np.stack([fill_holes_and_remove_small_masks(p, min_size=15) for p in planes])
    stitched = stitch3D(planes, stitch_threshold=0.25)
    ap, *_ = average_precision(gt, stitched, thresholds=(0.5,))
    assert ap[0] >= 0.95, ap
    unstitched_ap = average_precision(gt, planes, thresholds=(0.5,))[0][0]
    assert unstitched_ap < 0.2
