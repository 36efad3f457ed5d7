"""Bundled model weights, sample volume and icons, found next to this file."""

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent
MODELS_DIR = RESOURCES / "models"
SAMPLE_DIR = RESOURCES / "sample"
ICONS_DIR = RESOURCES / "icons"

DEFAULT_MODEL = "cp3d_nuclei"  # the bundled model used when none is named (CLI, API, app)
