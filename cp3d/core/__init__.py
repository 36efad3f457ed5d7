"""The cp3d pipeline: reading, normalization, network, inference, dynamics, stitching, training.

Importable without Qt. The main entry points:

- :func:`segment` runs the whole 3D pipeline on a volume and returns a :class:`Result`.
- :func:`cp3d.core.dynamics.masks_from_flows` turns flows + cell probability into masks.
"""
