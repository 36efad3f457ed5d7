"""Bundled model weights, sample volume and icons, found next to this file."""

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent
MODELS_DIR = RESOURCES / "models"
SAMPLE_DIR = RESOURCES / "sample"
ICONS_DIR = RESOURCES / "icons"
