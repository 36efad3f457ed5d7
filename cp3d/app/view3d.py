"""vispy 3D view: the image as a Volume (MIP or translucent) and the masks as a label
volume whose colours match the 2D views. Large volumes are subsampled for the GPU.
"""

from __future__ import annotations

import numpy as np

from .render import HIGHLIGHT, downsample_for_3d, label_colors

LABEL_ALPHA = 230


def label_rgba(masks: np.ndarray, selected=()) -> np.ndarray:
    """(Z, Y, X, 4) uint8 colours of the labels, same palette as the 2D views; selected
    labels white, background fully transparent."""
    rgba = np.zeros(masks.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = label_colors(masks)
    rgba[..., 3] = np.where(masks != 0, LABEL_ALPHA, 0).astype(np.uint8)
    if len(selected):
        sel = np.isin(masks, np.asarray(selected, dtype=masks.dtype))
        rgba[sel, :3] = HIGHLIGHT
        rgba[sel, 3] = 255
    return rgba


class View3D:
    """Owns a vispy SceneCanvas; ``widget`` is the Qt widget to put in a layout."""

    def __init__(self, parent=None):
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
        self.title = scene.Text("3D", color="white", bold=True, font_size=9, anchor_x="left",
                                anchor_y="top", parent=self.canvas.scene, pos=(8, 6))

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

    def set_masks(self, masks: np.ndarray | None, selected=()) -> None:
        scene = self._scene
        if masks is None or self.shape is None:
            if self.label_visual is not None:
                self.label_visual.parent = None
                self.label_visual = None
            self._masks_small = None
            self.canvas.update()
            return
        s = self.steps
        self._masks_small = np.ascontiguousarray(masks[:: s[0], :: s[1], :: s[2]])
        vals = label_rgba(self._masks_small, selected)
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
            self.label_visual.set_data(label_rgba(self._masks_small, selected), clim=(0.0, 255.0))
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
            self.view.camera.scale_factor = extent * 1.3
            self.view.camera.distance = None
        self.canvas.update()

    def render(self) -> np.ndarray:
        """RGBA screenshot of the canvas (for tests and figures)."""
        return self.canvas.render()
