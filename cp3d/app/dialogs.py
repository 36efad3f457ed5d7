"""Small dialogs: which axis is Z and which is channel, when the file does not say."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QSpinBox,
    QVBoxLayout,
)


class AxesDialog(QDialog):
    """Asks for the Z axis and channel axis (indices into the file's array shape).

    -1 means "none" (no Z: a 2D image; no channel axis: one channel).
    """

    def __init__(self, path, shape: tuple[int, ...], suggested=(None, None), parent=None,
                 reopen: bool = False):
        super().__init__(parent)
        self.setWindowTitle("Which axes are Z and channel?")
        self.shape = tuple(int(s) for s in shape)
        n = len(self.shape)
        dims = "  ".join(f"axis {i}: {s}" for i, s in enumerate(self.shape))
        why = ("it is read with the axes below" if reopen
               else "its metadata does not say which axis is which")
        text = QLabel(
            f"<b>{path}</b><br>The array is shaped {self.shape} and {why}.<br>{dims}<br><br>"
            f"Pick the Z (depth) axis and the channel axis; the two largest remaining axes are "
            f"Y and X. Any other axis must have length 1."
        )
        text.setWordWrap(True)
        self.z_axis = QSpinBox(minimum=-1, maximum=n - 1)
        self.z_axis.setSpecialValueText("none (2D)")
        self.channel_axis = QSpinBox(minimum=-1, maximum=n - 1)
        self.channel_axis.setSpecialValueText("none")
        z, c = suggested if suggested is not None else (None, None)
        self.z_axis.setValue(-1 if z is None else int(z) % n)
        self.channel_axis.setValue(-1 if c is None else int(c) % n)
        self.z_axis.setToolTip("Index of the depth axis in the shape above")
        self.channel_axis.setToolTip("Index of the channel axis in the shape above")
        self.z_axis.valueChanged.connect(self._validate)
        self.channel_axis.valueChanged.connect(self._validate)
        form = QFormLayout()
        form.addRow("Z axis", self.z_axis)
        form.addRow("channel axis", self.channel_axis)
        self.problem = QLabel("")
        self.problem.setStyleSheet("color: #d05050")
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(text)
        lay.addLayout(form)
        lay.addWidget(self.problem)
        lay.addWidget(self.buttons)
        self._validate()

    def axes(self) -> tuple[int | None, int | None]:
        z, c = self.z_axis.value(), self.channel_axis.value()
        return (None if z < 0 else z, None if c < 0 else c)

    def _validate(self, *_) -> None:
        z, c = self.axes()
        msg = ""
        if z is not None and z == c:
            msg = "Z and channel must be different axes."
        self.problem.setText(msg)
        self.buttons.button(QDialogButtonBox.Ok).setEnabled(not msg)
