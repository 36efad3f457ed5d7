"""Diameter estimation with the bundled model on fresh synthetic nuclei (seeds never trained
on): the estimate lands near the true median slice diameter at small and large sizes, and a
run with no diameter given is as good as one given the truth."""

import numpy as np
import pytest
import torch

from cp3d.core.metrics import average_precision
from cp3d.core.models import load_model
from cp3d.core.pipeline import segment
from cp3d.core.size import estimate_diameter, mask_diameters, pick_planes
from cp3d.core.synth import random_volume


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return load_model(None)


@pytest.mark.parametrize("diameter", [10.0, 36.0])
def test_estimate_is_near_the_true_slice_diameter(model, diameter):
    shape = (12, 112, 112) if diameter < 20 else (8, 224, 224)
    img, labels, _ = random_volume(3001 + int(diameter), "nuclei", shape=shape,
                                   diameter=diameter, anisotropy=1.0)
    true = float(np.median(mask_diameters(labels[pick_planes(labels.shape[0], 6)])))
    assert estimate_diameter(img, model) == pytest.approx(true, rel=0.2)


def test_default_run_matches_run_with_true_diameter(model):
    img, labels, meta = random_volume(3100, "nuclei", shape=(20, 112, 112), diameter=24.0,
                                      anisotropy=1.0)
    auto = segment(img, model)
    true = float(np.median(mask_diameters(labels[pick_planes(labels.shape[0], 6)])))
    given = segment(img, model, diameter=true)
    ap_auto = average_precision(labels, auto.masks, thresholds=(0.5,))[0][0]
    ap_given = average_precision(labels, given.masks, thresholds=(0.5,))[0][0]
    print(f"estimated {auto.diameter:.1f} px: AP@0.5 {ap_auto:.3f}; given: {ap_given:.3f}")
    assert auto.params["diameter_estimated"]
    assert ap_auto >= 0.85 and ap_auto >= ap_given - 0.05
