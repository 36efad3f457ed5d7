"""vispy 3D view: the image as a Volume (MIP or translucent) and the masks as a label
volume whose colours match the 2D views. Large volumes are subsampled for the GPU.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .render import HIGHLIGHT, downsample_for_3d, label_colors

LABEL_ALPHA = 235
SHADE_MAX_VOXELS = 6_000_000  # above this, skip the (CPU) shading to keep edits snappy
LIGHT = np.array([0.75, -0.45, 0.5])  # (z, y, x) direction of a fixed lamp, in voxel axes


def label_shading(masks: np.ndarray, anisotropy: float = 1.0) -> np.ndarray | None:
    """Brightness per voxel (float32, 0.35..1) from a fixed light on the smoothed surface of
    the masks, darker where two cells touch: the flat label colours then read as 3D shapes.
    Baked into the colours because vispy's lit 'iso' mode would remap label colours."""
    if masks.size > SHADE_MAX_VOXELS or masks.ndim != 3 or min(masks.shape) < 2:
        return None
    from scipy import ndimage

    fg = (masks != 0).astype(np.float32)
    sigma = (max(0.6, 1.2 / max(anisotropy, 1e-3)), 1.2, 1.2)
    smooth = ndimage.gaussian_filter(fg, sigma)
    gz, gy, gx = np.gradient(smooth)
    gz = gz / max(anisotropy, 1e-3)
    norm = np.sqrt(gz * gz + gy * gy + gx * gx) + 1e-6
    light = LIGHT / np.linalg.norm(LIGHT)
    # outward normal is -gradient of the foreground
    lambert = -(gz * light[0] + gy * light[1] + gx * light[2]) / norm
    shade = 0.55 + 0.45 * np.clip(lambert, -1, 1)
    # where the normal is ill-defined (deep inside), keep full colour
    shade = np.where(norm > 0.02, shade, 0.85).astype(np.float32)
    touch = np.zeros(masks.shape, dtype=bool)
    for ax in range(3):
        a = np.swapaxes(masks, 0, ax)
        t = np.swapaxes(touch, 0, ax)
        diff = (a[1:] != a[:-1]) & (a[1:] != 0) & (a[:-1] != 0)
        t[1:] |= diff
        t[:-1] |= diff
    shade[touch] *= 0.6
    return np.clip(shade, 0.3, 1.0)


def label_rgba(masks: np.ndarray, selected=(), shading: np.ndarray | None = None) -> np.ndarray:
    """(Z, Y, X, 4) uint8 colours of the labels, same palette as the 2D views; selected
    labels white, background fully transparent."""
    rgba = np.zeros(masks.shape + (4,), dtype=np.uint8)
    rgb = label_colors(masks)
    if len(selected):
        sel = np.isin(masks, np.asarray(selected, dtype=masks.dtype))
        rgb[sel] = HIGHLIGHT
    if shading is not None:
        rgb = (rgb * shading[..., None]).astype(np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = np.where(masks != 0, LABEL_ALPHA, 0).astype(np.uint8)
    return rgba


class View3D:
    """Owns a vispy SceneCanvas; ``widget`` is the Qt widget to put in a layout."""

    def __init__(self, parent=None):
        import vispy

        try:
            vispy.use(app="pyside6")
        except RuntimeError:  # a backend was already chosen (e.g. by a test); use it
            pass
        from vispy import scene

        self.canvas = scene.SceneCanvas(keys=None, show=False, bgcolor="#18181c", parent=parent)
        self.widget = self.canvas.native
        self.view = self.canvas.central_widget.add_view()
        self.view.camera = scene.TurntableCamera(fov=30, elevation=25, azimuth=-60)
        self._scene = scene
        self.image_visual = None
        self.label_visual = None
        self.steps = (1, 1, 1)
        self.shape = None
        self.anisotropy = 1.0
        self.method = "mip"
        self.show_image = True
        self.show_masks = True
        self._masks_small = None
        self._image_small = None
        self._shading = None
        self.title = scene.Text("3D", color="white", bold=True, font_size=9, anchor_x="left",
                                anchor_y="center", parent=self.canvas.scene, pos=(10, 14))
        # on_pick(voxel (z, y, x) or None, label, add): a click (not a drag) on the canvas
        self.on_pick: Callable[[tuple[int, int, int], int, bool], None] | None = None
        self._press_pos = None
        self.canvas.events.mouse_press.connect(self._mouse_press)
        self.canvas.events.mouse_release.connect(self._mouse_release)

    # ---- data ------------------------------------------------------------------------
    def set_image(self, data: np.ndarray | None, clim: tuple[float, float],
                  anisotropy: float = 1.0) -> None:
        """data (Z, Y, X) of one channel; resets the camera when the shape changes."""
        scene = self._scene
        if data is None:
            for v in (self.image_visual, self.label_visual):
                if v is not None:
                    v.parent = None
            self.image_visual = self.label_visual = None
            self.shape = self._image_small = self._masks_small = None
            self.canvas.update()
            return
        if getattr(data, "lazy", False):  # on disk: its preview (at most 128^3, read once)
            from .lazy import preview_steps

            small, steps = data.preview(), preview_steps(data.shape)
        else:
            small, steps = downsample_for_3d(data)
        small = small.astype(np.float32, copy=False)
        self._image_small = small
        new_shape = data.shape != self.shape
        self.shape, self.steps = data.shape, steps
        if self.image_visual is None:
            self.image_visual = scene.visuals.Volume(
                small, clim=clim, method=self.method, cmap="grays", parent=self.view.scene,
                relative_step_size=1.0,
            )
            self.image_visual.order = 1
        else:
            self.image_visual.set_data(small, clim=clim)
        self.image_visual.visible = self.show_image
        self.set_anisotropy(anisotropy, reset_camera=new_shape)

    def set_clim(self, clim: tuple[float, float]) -> None:
        if self.image_visual is not None:
            self.image_visual.clim = clim
            self.canvas.update()

    def set_method(self, method: str) -> None:
        """'mip' (brightest voxel along each ray) or 'translucent' (front-to-back blending)."""
        self.method = method
        if self.image_visual is not None:
            self.image_visual.method = method
            self.canvas.update()

    def set_masks(self, masks: np.ndarray | None, selected=(), reshade: bool = True) -> None:
        """Upload the label volume. reshade=False (edits) keeps the cached surface shading,
        which costs a Gaussian filter over the volume, so deletes and merges stay instant."""
        scene = self._scene
        if masks is None or self.shape is None:
            if self.label_visual is not None:
                self.label_visual.parent = None
                self.label_visual = None
            self._masks_small = None
            self.canvas.update()
            return
        s = self.steps
        if getattr(masks, "lazy", False):  # same shape as the image: same steps, read once
            small = np.ascontiguousarray(masks.preview())
        else:
            small = np.ascontiguousarray(masks[:: s[0], :: s[1], :: s[2]])
        if reshade or self._shading is None or self._shading.shape != small.shape:
            self._shading = label_shading(small, self.anisotropy * s[0] / s[1])
        self._masks_small = small
        vals = label_rgba(self._masks_small, selected, self._shading)
        clim = (0.0, 255.0)
        if self.label_visual is None:
            # RGBA volume, translucent + nearest: front-to-back compositing of nearly opaque
            # label colours, so the nearest cell hides those behind it (MIP would instead
            # show whichever colour is brightest).
            self.label_visual = scene.visuals.Volume(
                vals, clim=clim, method="translucent", interpolation="nearest",
                parent=self.view.scene, relative_step_size=0.7,
            )
            self.label_visual.order = 0
        else:
            self.label_visual.set_data(vals, clim=clim)
        self.label_visual.visible = self.show_masks
        self._apply_transform(self.label_visual)
        self.canvas.update()

    def set_selection(self, selected=()) -> None:
        if self.label_visual is not None and self._masks_small is not None:
            self.label_visual.set_data(label_rgba(self._masks_small, selected, self._shading),
                                       clim=(0.0, 255.0))
            self.canvas.update()

    def set_visible_layers(self, image: bool, masks: bool) -> None:
        self.show_image, self.show_masks = image, masks
        if self.image_visual is not None:
            self.image_visual.visible = image
        if self.label_visual is not None:
            self.label_visual.visible = masks
        self.canvas.update()

    # ---- geometry --------------------------------------------------------------------
    def _apply_transform(self, visual) -> None:
        from vispy.visuals.transforms import STTransform

        if visual is None or self.shape is None:
            return
        sz, sy, sx = self.steps
        z, y, x = self.shape
        # vispy maps array axes (z, y, x) to scene (z, y, x) = (2, 1, 0); centre the volume.
        visual.transform = STTransform(
            scale=(sx, sy, sz * self.anisotropy),
            translate=(-x / 2, -y / 2, -z * self.anisotropy / 2),
        )

    def set_anisotropy(self, anisotropy: float, reset_camera: bool = False) -> None:
        self.anisotropy = float(anisotropy) if anisotropy and anisotropy > 0 else 1.0
        self._apply_transform(self.image_visual)
        self._apply_transform(self.label_visual)
        if reset_camera and self.shape is not None:
            z, y, x = self.shape
            extent = max(x, y, z * self.anisotropy)
            self.view.camera.center = (0, 0, 0)
            self.view.camera.scale_factor = extent * 1.15
            self.view.camera.distance = None
        self.canvas.update()

    # ---- picking ---------------------------------------------------------------------
    def _mouse_press(self, event) -> None:
        self._press_pos = np.asarray(event.pos[:2], float) if event.button == 1 else None

    def _mouse_release(self, event) -> None:
        start, self._press_pos = self._press_pos, None
        if start is None or event.button != 1 or self.on_pick is None:
            return
        if np.abs(np.asarray(event.pos[:2], float) - start).max() > 3:
            return  # a drag turned the camera: not a click
        mods = [getattr(k, "name", str(k)).lower() for k in (event.modifiers or ())]
        add = "control" in mods or "meta" in mods
        hit = self.pick(event.pos[:2])
        self.on_pick(*(hit if hit is not None else (None, 0)), add)  # None: missed the volume

    def ray(self, pos) -> tuple[np.ndarray, np.ndarray] | None:
        """The line of sight under canvas position ``pos`` (logical pixels) as (start, end)
        points in array index coordinates (x, y, z) of the shown (subsampled) volume. The
        visual's transform holds the camera and the anisotropy scaling, so un-projecting
        through it gives the ray in voxel units."""
        visual = self.label_visual if self.label_visual is not None else self.image_visual
        if visual is None:
            return None
        tr = visual.get_transform("canvas", "visual")
        ends = []
        for depth in (-1.0, 1.0):  # near and far clipping planes
            p = np.asarray(tr.map([pos[0], pos[1], depth, 1.0]), float)
            if abs(p[3]) < 1e-12:
                return None
            ends.append(p[:3] / p[3])
        return ends[0], ends[1]

    def pick(self, pos) -> tuple[tuple[int, int, int], int] | None:
        """(voxel (z, y, x) at full resolution, label) hit by a click at canvas ``pos``.

        Marches along the ray in half-voxel steps through the shown label volume and takes
        the first non-zero label (what the user sees in front); without masks, or off them,
        the brightest image voxel on the ray (what MIP shows) and label 0. None: missed."""
        r = self.ray(pos)
        if r is None or self.shape is None:
            return None
        a, b = r
        small = self._masks_small if (self.label_visual is not None and self.show_masks) else None
        n = np.array([-(-s // st) for s, st in zip(self.shape, self.steps)])[::-1]  # x, y, z
        d = b - a
        with np.errstate(divide="ignore", invalid="ignore"):
            t0 = (-0.5 - a) / d
            t1 = (n - 0.5 - a) / d
        lo = np.nanmax(np.where(d != 0, np.minimum(t0, t1), -np.inf))
        hi = np.nanmin(np.where(d != 0, np.maximum(t0, t1), np.inf))
        lo = max(lo, 0.0)
        if not hi > lo:
            return None
        length = np.linalg.norm(d) * (hi - lo)
        t = np.linspace(lo, hi, max(2, int(np.ceil(length * 2)) + 1))
        pts = np.rint(a[None] + t[:, None] * d[None]).astype(int)
        pts = np.clip(pts, 0, n - 1)
        zi, yi, xi = pts[:, 2], pts[:, 1], pts[:, 0]
        steps = np.asarray(self.steps)
        if small is not None:
            labels = small[zi, yi, xi]
            hits = np.flatnonzero(labels)
            if hits.size:
                k = hits[0]
                voxel = tuple(int(v) for v in np.array([zi[k], yi[k], xi[k]]) * steps)
                return voxel, int(labels[k])
        data = self._image_small
        if data is None:
            return None
        k = int(np.argmax(data[zi, yi, xi]))
        return tuple(int(v) for v in np.array([zi[k], yi[k], xi[k]]) * steps), 0

    def project(self, voxel) -> tuple[float, float] | None:
        """Canvas position (logical pixels) where full-resolution voxel (z, y, x) is drawn."""
        visual = self.label_visual if self.label_visual is not None else self.image_visual
        if visual is None:
            return None
        z, y, x = (v / s for v, s in zip(voxel, self.steps))
        p = np.asarray(visual.get_transform("visual", "canvas").map([x, y, z, 1.0]), float)
        return float(p[0] / p[3]), float(p[1] / p[3])

    def render(self) -> np.ndarray:
        """RGBA screenshot of the canvas (for tests and figures)."""
        return self.canvas.render()
