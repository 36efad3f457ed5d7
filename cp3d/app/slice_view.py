"""A 2D plane view: draws an RGB array with QPainter (nearest-neighbour), a crosshair and
a title, and reports clicks in pixel coordinates. Knows nothing about volumes or masks.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

CROSS_COLOR = QColor(255, 215, 0, 170)
BACKGROUND = QColor(24, 24, 28)


class SliceView(QWidget):
    """Shows one plane. ``clicked(row, col, add)``: left click (add = ctrl held);
    ``dragged(row, col)``: cursor moved with the button held; ``scrolled(steps)``: wheel;
    zoom with ctrl+wheel, double-click resets the zoom."""

    clicked = Signal(int, int, bool)
    dragged = Signal(int, int)
    scrolled = Signal(int)

    def __init__(self, title: str, parent=None):
        super().__init__(parent)
        self.title = title
        self.subtitle = ""
        self.placeholder = ""  # text shown while there is no image
        self._qimage: QImage | None = None
        self._buf: np.ndarray | None = None
        self._shape = (0, 0)
        self.aspect = (1.0, 1.0)  # physical size of one pixel (rows, cols)
        self.cross: tuple[int, int] | None = None
        self.zoom = 1.0
        self.center: tuple[float, float] | None = None  # pixel (row, col) at widget centre
        self.setMinimumSize(120, 80)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.setMouseTracking(False)
        self.setFocusPolicy(Qt.ClickFocus)

    # ---- data ------------------------------------------------------------------------
    def set_image(self, rgb: np.ndarray | None, aspect: tuple[float, float] = (1.0, 1.0)) -> None:
        if rgb is None:
            self._qimage, self._buf, self._shape = None, None, (0, 0)
        else:
            buf = np.ascontiguousarray(rgb, dtype=np.uint8)
            h, w = buf.shape[:2]
            if (h, w) != self._shape:
                self.zoom, self.center = 1.0, None
            self._buf = buf  # QImage does not own the memory: keep it alive
            self._qimage = QImage(buf.data, w, h, 3 * w, QImage.Format_RGB888)
            self._shape = (h, w)
        self.aspect = (float(aspect[0]), float(aspect[1]))
        self.update()

    def image_array(self) -> np.ndarray | None:
        return self._buf

    # ---- geometry --------------------------------------------------------------------
    def _target(self) -> QRectF:
        """Rectangle (widget coords) where the whole image is drawn."""
        h, w = self._shape
        if h == 0 or w == 0:
            return QRectF()
        ph, pw = h * self.aspect[0], w * self.aspect[1]
        scale = min(self.width() / pw, (self.height() - 4) / ph) * self.zoom
        tw, th = pw * scale, ph * scale
        if self.center is None:
            cx, cy = self.width() / 2 - tw / 2, self.height() / 2 - th / 2
        else:
            r, c = self.center
            cx = self.width() / 2 - (c + 0.5) / w * tw
            cy = self.height() / 2 - (r + 0.5) / h * th
        return QRectF(cx, cy, tw, th)

    def widget_to_pixel(self, pos: QPointF) -> tuple[int, int] | None:
        t = self._target()
        if t.isEmpty() or not t.contains(pos):
            return None
        h, w = self._shape
        row = int((pos.y() - t.top()) / t.height() * h)
        col = int((pos.x() - t.left()) / t.width() * w)
        return min(row, h - 1), min(col, w - 1)

    def pixel_to_widget(self, row: float, col: float) -> QPointF:
        t = self._target()
        h, w = self._shape
        return QPointF(t.left() + (col + 0.5) / w * t.width(),
                       t.top() + (row + 0.5) / h * t.height())

    # ---- painting --------------------------------------------------------------------
    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), BACKGROUND)
        if self._qimage is not None:
            t = self._target()
            p.setRenderHint(QPainter.SmoothPixmapTransform, False)
            p.drawImage(t, self._qimage)
            if self.cross is not None:
                pen = QPen(CROSS_COLOR, 1, Qt.DashLine)
                p.setPen(pen)
                pt = self.pixel_to_widget(*self.cross)
                p.drawLine(QPointF(t.left(), pt.y()), QPointF(t.right(), pt.y()))
                p.drawLine(QPointF(pt.x(), t.top()), QPointF(pt.x(), t.bottom()))
        elif self.placeholder:
            p.setPen(QColor(150, 150, 160))
            p.drawText(self.rect(), Qt.AlignCenter | Qt.TextWordWrap, self.placeholder)
        p.setPen(QColor(235, 235, 235))
        f = p.font()
        f.setBold(True)
        p.setFont(f)
        p.drawText(8, 18, self.title)
        if self.subtitle:
            f.setBold(False)
            p.setFont(f)
            p.drawText(8 + p.fontMetrics().horizontalAdvance(self.title) + 14, 18, self.subtitle)
        p.end()

    # ---- input -----------------------------------------------------------------------
    def mousePressEvent(self, event) -> None:
        if event.button() == Qt.LeftButton:
            px = self.widget_to_pixel(event.position())
            if px is not None:
                add = bool(event.modifiers() & (Qt.ControlModifier | Qt.MetaModifier))
                self.clicked.emit(px[0], px[1], add)
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event) -> None:
        if event.buttons() & Qt.LeftButton:
            px = self.widget_to_pixel(event.position())
            if px is not None:
                self.dragged.emit(*px)
        super().mouseMoveEvent(event)

    def mouseDoubleClickEvent(self, event) -> None:
        self.zoom, self.center = 1.0, None
        self.update()

    def wheelEvent(self, event) -> None:
        dy = event.angleDelta().y()
        steps = dy // 120 or int(np.sign(dy))  # a fine-grained wheel's partial step counts as one
        if not steps:
            return
        if event.modifiers() & Qt.ControlModifier:
            px = self.widget_to_pixel(event.position())
            self.zoom = float(np.clip(self.zoom * (1.25 ** steps), 1.0, 32.0))
            if self.zoom == 1.0:
                self.center = None
            elif px is not None:
                self.center = (float(px[0]), float(px[1]))
            self.update()
        else:
            self.scrolled.emit(int(steps))
        event.accept()
