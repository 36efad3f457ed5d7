"""The app's plain-Python model and numpy rendering (no display needed)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from cp3d.app import render
from cp3d.app.state import AppState, auto_contrast


def make_state(z=4, y=10, x=12, channels=1):
    rng = np.random.default_rng(0)
    data = rng.random((z, channels, y, x)).astype(np.float32)
    vol = types.SimpleNamespace(data=data, path=None, voxel_size=(2.0, 0.5, 0.5), anisotropy=4.0)
    masks = np.zeros((z, y, x), np.uint16)
    masks[:, 1:4, 1:4] = 1
    masks[:, 5:8, 1:4] = 2
    masks[:, 5:8, 6:10] = 7
    st = AppState()
    st.set_volume(vol, masks.copy())
    return st, masks


def test_set_volume_centres_cursor_and_takes_anisotropy():
    st, _ = make_state()
    assert st.position == [2, 5, 6] and st.anisotropy == 4.0
    assert st.shape == (4, 10, 12) and not st.dirty
    with pytest.raises(ValueError):
        st.set_masks(np.zeros((4, 10, 11), np.uint16))


def test_delete_merge_undo_redo_restore_exact_labels():
    st, m0 = make_state()
    events = []
    st.events.connect("masks", lambda: events.append("masks"))
    st.select(2)
    st.select(7, add=True)
    assert st.selection == [2, 7]
    assert st.merge_labels() == 2
    assert not (st.masks == 7).any() and (st.masks == 2).sum() == (m0 == 2).sum() + (m0 == 7).sum()
    assert st.selection == [2] and st.dirty
    st.delete_labels()
    assert not (st.masks == 2).any() and (st.masks == 1).sum() == (m0 == 1).sum()
    assert st.undo_edit().startswith("delete")
    assert st.undo_edit().startswith("merge")
    np.testing.assert_array_equal(st.masks, m0)
    assert st.undo_edit() is None
    st.redo_edit()
    st.redo_edit()
    assert set(np.unique(st.masks)) == {0, 1}
    # a new edit clears the redo list
    st.undo_edit()
    st.delete_labels([1])
    assert not st.undo.can_redo
    assert len(events) >= 6


def test_click_selection_rules():
    st, _ = make_state()
    st.select(0)
    assert st.selection == []
    st.select(1)
    st.select(2, add=True)
    st.select(1, add=True)  # ctrl-click again removes
    assert st.selection == [2]
    st.select(7)  # plain click replaces
    assert st.selection == [7]


def test_colours_are_stable_and_distinct():
    ids = np.arange(1, 201)
    c1 = render.label_colors(ids)
    c2 = render.label_colors(ids[::-1])[::-1]
    np.testing.assert_array_equal(c1, c2)  # depends on the id only
    assert (render.label_colors(np.array([0])) == 0).all()
    # neighbouring ids get clearly different colours
    d = np.abs(c1[1:].astype(int) - c1[:-1].astype(int)).sum(axis=1)
    assert np.median(d) > 100
    assert len({tuple(c) for c in c1}) > 150


def test_planes_and_click_mapping_agree():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    pos = (1, 2, 3)
    for view in ("xy", "xz", "yz"):
        p = render.plane(vol, view, pos)
        for r, c in [(0, 0), (p.shape[0] - 1, p.shape[1] - 1), (1, 2)]:
            z, y, x = render.plane_to_voxel(view, r, c, pos)
            assert vol[z, y, x] == p[r, c]
    assert render.plane(vol, "yz", pos).shape == (5, 4)
    assert render.plane(vol, "xz", pos).shape == (4, 6)


def test_compose_overlay_outline_and_selection():
    gray = np.full((10, 10), 100, np.uint8)
    lab = np.zeros((10, 10), np.uint16)
    lab[2:8, 2:8] = 5
    rgb = render.compose(gray, lab, opacity=0.5, outlines=True)
    col = render.label_colors(np.array([5]))[0]
    assert (rgb[0, 0] == 100).all()
    np.testing.assert_array_equal(rgb[2, 4], col)  # outline drawn in the label colour
    inner = rgb[5, 5].astype(int)
    assert np.abs(inner - (100 + (col.astype(int) - 100) * 0.5)).max() <= 1
    sel = render.compose(gray, lab, opacity=0.5, outlines=False, selected=[5])
    assert (sel[2, 4] == 255).all() and not (sel[5, 5] == 255).all()
    none = render.compose(gray, lab, opacity=0.0, outlines=False)
    assert (none == 100).all()


def test_auto_contrast_and_downsampling():
    data = np.concatenate([np.zeros(1000), np.linspace(0, 1, 1000), [1e6]])
    lo, hi = auto_contrast(data)
    assert lo == 0.0 and hi < 1e5
    big = np.zeros((300, 600, 700), np.uint8)
    small, steps = render.downsample_for_3d(big, max_voxels=2_000_000, max_side=256)
    assert small.size <= 2_000_000 and max(small.shape) <= 256
    assert small.shape == tuple(-(-s // st) for s, st in zip(big.shape, steps))
