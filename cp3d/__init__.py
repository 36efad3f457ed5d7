"""cp3d: 3D cell and nucleus segmentation built on the Cellpose method."""

__version__ = "0.1.0"
