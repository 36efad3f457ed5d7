"""vispy 3D view: the image as a Volume (MIP or translucent) and the masks as a label
volume whose colours match the 2D views. Large volumes are subsampled for the GPU.
"""

from __future__ import annotations

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
        self._shading = None
        self.title = scene.Text("3D", color="white", bold=True, font_size=9, anchor_x="left",
                                anchor_y="center", parent=self.canvas.scene, pos=(10, 14))

    # ---- data ------------------------------------------------------------------------
    def set_image(self, data: np.ndarray | None, clim: tuple[float, float], anisotropy: float = 1.0) -> None:
        """data (Z, Y, X) of one channel; resets the camera when the shape changes."""
        scene = self._scene
        if data is None:
            for v in (self.image_visual, self.label_visual):
                if v is not None:
                    v.parent = None
            self.image_visual = self.label_visual = None
            self.shape = None
            self.canvas.update()
            return
        small, steps = downsample_for_3d(data)
        small = small.astype(np.float32, copy=False)
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

    def render(self) -> np.ndarray:
        """RGBA screenshot of the canvas (for tests and figures)."""
        return self.canvas.render()
