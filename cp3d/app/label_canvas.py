"""The drawing surface of the labeling mode: shows one crop with its masks, turns mouse input
into strokes in pixel coordinates, zooms and pans. Knows nothing about files or undo.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from . import render

TOOLS = ("draw", "brush", "erase", "select")
BACKGROUND = QColor(24, 24, 28)
STROKE = QColor(255, 230, 60)


class LabelCanvas(QWidget):
    """``stroke_finished(tool, points)``: a finished outline or brush stroke, points as
    (row, col) floats; ``clicked(row, col, add)``: a click with the select tool (add = ctrl).
    Wheel zooms at the cursor; right- or middle-drag pans; double-click fits the crop."""

    stroke_finished = Signal(str, object)
    clicked = Signal(int, int, bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.tool = "draw"
        self.brush_radius = 4.0
        self.opacity = 0.4
        self.help_text = ""  # shown over the image while not empty (F1)
        self.message = ""  # shown when there is no crop
        self.gray: np.ndarray | None = None  # (H, W) uint8
        self.labels: np.ndarray | None = None
        self.selection: list[int] = []
        self.zoom = 1.0
        self.center: tuple[float, float] | None = None  # (row, col) at the widget centre
        self._qimage: QImage | None = None
        self._buf: np.ndarray | None = None
        self._stroke: list[tuple[float, float]] = []
        self._pan_from: QPointF | None = None
        self._hover: QPointF | None = None
        self.setMinimumSize(200, 200)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.setMouseTracking(True)  # the brush outline follows the cursor
        self.setFocusPolicy(Qt.StrongFocus)

    # ---- data ------------------------------------------------------------------------
    def set_crop(self, gray: np.ndarray | None, labels: np.ndarray | None) -> None:
        """A new crop: fit it to the widget."""
        self.gray = gray
        self.zoom, self.center = 1.0, None
        self.set_labels(labels)

    def set_labels(self, labels: np.ndarray | None, selection=()) -> None:
        self.labels = labels
        self.selection = list(selection)
        self.refresh()

    def refresh(self) -> None:
        """Recompose the picture after the labels changed in place."""
        if self.gray is None:
            self._qimage = self._buf = None
        else:
            rgb = render.compose(self.gray, self.labels, self.opacity, True, self.selection)
            self._buf = np.ascontiguousarray(rgb)
            h, w = self._buf.shape[:2]
            self._qimage = QImage(self._buf.data, w, h, 3 * w, QImage.Format_RGB888)
        self.update()

    # ---- geometry --------------------------------------------------------------------
    def scale(self) -> float:
        if self.gray is None:
            return 1.0
        h, w = self.gray.shape
        return min(self.width() / w, self.height() / h) * self.zoom

    def _centre(self) -> tuple[float, float]:
        h, w = self.gray.shape
        return self.center if self.center is not None else (h / 2, w / 2)

    def widget_to_pixel(self, pos: QPointF) -> tuple[float, float]:
        """(row, col) as floats, pixel (0, 0) spanning 0..1."""
        s = self.scale()
        r0, c0 = self._centre()
        return (r0 + (pos.y() - self.height() / 2) / s, c0 + (pos.x() - self.width() / 2) / s)

    def pixel_to_widget(self, row: float, col: float) -> QPointF:
        s = self.scale()
        r0, c0 = self._centre()
        return QPointF(self.width() / 2 + (col - c0) * s, self.height() / 2 + (row - r0) * s)

    def zoom_at(self, factor: float, pos: QPointF | None = None) -> None:
        """Zoom keeping the pixel under ``pos`` (default: the centre) in place."""
        if self.gray is None:
            return
        pos = pos if pos is not None else QPointF(self.width() / 2, self.height() / 2)
        before = self.widget_to_pixel(pos)
        self.zoom = float(np.clip(self.zoom * factor, 0.5, 40.0))
        r0, c0 = self._centre()
        after = self.widget_to_pixel(pos)
        self.center = (r0 + before[0] - after[0], c0 + before[1] - after[1])
        self.update()

    def reset_view(self) -> None:
        self.zoom, self.center = 1.0, None
        self.update()

    # ---- painting --------------------------------------------------------------------
    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), BACKGROUND)
        if self._qimage is not None:
            h, w = self.gray.shape
            tl = self.pixel_to_widget(0, 0)
            s = self.scale()
            p.setRenderHint(QPainter.SmoothPixmapTransform, False)
            p.drawImage(QRectF(tl.x(), tl.y(), w * s, h * s), self._qimage)
            p.setRenderHint(QPainter.Antialiasing, True)
            if self._stroke:
                self._paint_stroke(p, s)
            if self._hover is not None and self.tool in ("brush", "erase"):
                p.setPen(QPen(QColor(255, 255, 255, 200), 1))
                p.setBrush(Qt.NoBrush)
                r = self.brush_radius * s
                p.drawEllipse(self._hover, r, r)
        elif self.message:
            p.setPen(QColor(150, 150, 160))
            p.drawText(self.rect(), Qt.AlignCenter | Qt.TextWordWrap, self.message)
        if self.help_text:
            self._paint_help(p)
        p.end()

    def _paint_stroke(self, p: QPainter, s: float) -> None:
        pts = [self.pixel_to_widget(r, c) for r, c in self._stroke]
        if self.tool == "draw":
            path = QPainterPath(pts[0])
            for q in pts[1:]:
                path.lineTo(q)
            p.setPen(QPen(STROKE, 2))
            p.setBrush(QColor(255, 230, 60, 50))
            p.drawPath(path)
        else:
            col = QColor(255, 80, 80, 110) if self.tool == "erase" else QColor(255, 230, 60, 110)
            pen = QPen(col, max(2 * self.brush_radius * s, 1))
            pen.setCapStyle(Qt.RoundCap)
            pen.setJoinStyle(Qt.RoundJoin)
            p.setPen(pen)
            path = QPainterPath(pts[0])
            for q in pts[1:]:
                path.lineTo(q)
            if len(pts) == 1:
                path.lineTo(pts[0] + QPointF(0.01, 0))
            p.drawPath(path)

    def _paint_help(self, p: QPainter) -> None:
        lines = self.help_text.splitlines()
        f = p.font()
        fm = p.fontMetrics()
        width = max(fm.horizontalAdvance(t) for t in lines) + 40
        height = fm.lineSpacing() * len(lines) + 30
        box = QRectF((self.width() - width) / 2, (self.height() - height) / 2, width, height)
        p.setPen(Qt.NoPen)
        p.setBrush(QColor(15, 15, 20, 225))
        p.drawRoundedRect(box, 8, 8)
        p.setPen(QColor(235, 235, 235))
        y = box.top() + 15 + fm.ascent()
        for i, t in enumerate(lines):
            f.setBold(i == 0)
            p.setFont(f)
            p.drawText(QPointF(box.left() + 20, y), t)
            y += fm.lineSpacing()

    # ---- input -----------------------------------------------------------------------
    def mousePressEvent(self, event) -> None:
        self.setFocus()
        if self.gray is None:
            return
        pos = event.position()
        if event.button() in (Qt.RightButton, Qt.MiddleButton):
            self._pan_from = pos
        elif event.button() == Qt.LeftButton:
            r, c = self.widget_to_pixel(pos)
            if self.tool == "select":
                add = bool(event.modifiers() & (Qt.ControlModifier | Qt.MetaModifier))
                self.clicked.emit(int(np.floor(r)), int(np.floor(c)), add)
            else:
                self._stroke = [(r, c)]
                self.update()
        event.accept()

    def mouseMoveEvent(self, event) -> None:
        pos = event.position()
        self._hover = pos
        if self._pan_from is not None:
            d = pos - self._pan_from
            self._pan_from = pos
            r0, c0 = self._centre()
            s = self.scale()
            self.center = (r0 - d.y() / s, c0 - d.x() / s)
        elif self._stroke and event.buttons() & Qt.LeftButton:
            self._stroke.append(self.widget_to_pixel(pos))
        self.update()

    def mouseReleaseEvent(self, event) -> None:
        if event.button() in (Qt.RightButton, Qt.MiddleButton):
            self._pan_from = None
        elif event.button() == Qt.LeftButton and self._stroke:
            pts, self._stroke = self._stroke, []
            self.update()
            # pixel centres are at +0.5: outlines and brush positions in index coordinates
            self.stroke_finished.emit(self.tool, [(r - 0.5, c - 0.5) for r, c in pts])

    def leaveEvent(self, event) -> None:
        self._hover = None
        self.update()

    def mouseDoubleClickEvent(self, event) -> None:
        if event.button() != Qt.LeftButton or self.tool == "select":
            self.reset_view()

    def wheelEvent(self, event) -> None:
        dy = event.angleDelta().y()
        if dy:
            self.zoom_at(1.25 ** (dy / 120), event.position())
        event.accept()
