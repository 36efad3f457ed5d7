"""Finding, loading and saving networks: bundled models, user models, Cellpose ``.pth`` files.

A model file is a plain state dict with Cellpose's keys (so Cellpose can load ours and we can
load Cellpose 2/3 models); the architecture is read back from the tensor shapes. Bundled
weights may be stored in float16 to keep the download small; they run in float32.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .errors import ModelError
from .net import CPnet, nbase_from_state_dict

log = logging.getLogger("cp3d")

DEFAULT_MODEL = "cp3d_nuclei"
MODEL_SUFFIXES = ("", ".pth", ".pt")


def bundled_models_dir() -> Path:
    from cp3d.resources import MODELS_DIR

    return MODELS_DIR


def user_models_dir() -> Path:
    """Per-user folder for trained models (never inside the install folder)."""
    env = os.environ.get("CP3D_USER_MODELS")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("cp3d", appauthor=False)) / "models"


def pick_device(use_gpu: bool = False) -> torch.device:
    """CUDA, then Apple MPS, when asked and present; else the CPU (with a note why)."""
    if use_gpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        log.warning("GPU asked for but none is available: running on the CPU")
    return torch.device("cpu")


@dataclass
class ModelInfo:
    name: str
    path: Path
    bundled: bool


@dataclass
class Model:
    """A network ready for inference, with the diameters it was trained for."""

    net: CPnet
    name: str
    path: Optional[Path]
    device: torch.device

    @property
    def diam_mean(self) -> float:
        return float(self.net.diam_mean.item())

    @property
    def diam_labels(self) -> float:
        return float(self.net.diam_labels.item())

    @property
    def nchan(self) -> int:
        return self.net.nchan

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, H, W) float32 -> (flows+cellprob (N, 3, H, W), style (N, S))."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            out, style = self.net(x)
        return out.float().cpu().numpy(), style.float().cpu().numpy()


def list_models() -> list[ModelInfo]:
    """Bundled models first, then the user's, by name."""
    found = []
    for folder, bundled in ((bundled_models_dir(), True), (user_models_dir(), False)):
        if folder.is_dir():
            for p in sorted(folder.glob("*.pth")):
                found.append(ModelInfo(p.stem, p, bundled))
    return found


def resolve_model_path(name_or_path: Union[str, Path, None]) -> Path:
    """A path as given, or a bundled/user model by name; :class:`ModelError` if none."""
    name = DEFAULT_MODEL if name_or_path in (None, "") else str(name_or_path)
    path = Path(name).expanduser()
    looks_like_path = path.suffix in (".pth", ".pt") or os.sep in name or path.exists()
    if looks_like_path:
        if not path.exists():
            raise ModelError("model file not found", path)
        return path
    for folder in (bundled_models_dir(), user_models_dir()):
        for suffix in MODEL_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    names = ", ".join(m.name for m in list_models()) or "none installed"
    raise ModelError(f"no model named '{name}' (available: {names})")


def load_state_dict(path: Path) -> dict:
    """Read a state dict safely (``weights_only``), accepting a training checkpoint too."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelError(f"not a readable model file ({first})", path) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError("not a network state dict", path)
    return state


def net_from_state_dict(state: dict, path: Optional[Path] = None) -> CPnet:
    """Build the CPnet whose shapes match ``state`` and load it (strict keys)."""
    nbase = nbase_from_state_dict(state)
    if len(nbase) < 3 or "output.2.weight" not in state:
        raise ModelError("not a Cellpose/cp3d network (unknown layer names)", path)
    nout = int(state["output.2.weight"].shape[0])
    diam = float(state["diam_mean"].reshape(-1)[0]) if "diam_mean" in state else 30.0
    net = CPnet(nbase, nout, 3, diam_mean=diam)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if "diam_labels" not in state:  # Cellpose 2 files: no diam_labels
        state["diam_labels"] = torch.full((1,), diam)
    if "diam_mean" not in state:
        state["diam_mean"] = torch.full((1,), diam)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"weights do not match the network ({str(err).splitlines()[0][:160]})",
                         path) from None
    if nout != 3:
        raise ModelError(f"network has {nout} outputs, expected 3 (flows and cell probability)",
                         path)
    return net


def load_model(name_or_path: Union[str, Path, None] = None,
               device: Optional[torch.device] = None) -> Model:
    """Load a bundled model by name (default ``cp3d_nuclei``), a user model, or a file."""
    path = resolve_model_path(name_or_path)
    net = net_from_state_dict(load_state_dict(path), path)
    device = device or torch.device("cpu")
    net.to(device).eval()
    return Model(net=net, name=path.stem, path=path, device=device)


def save_model(net: CPnet, path: Union[str, Path], metadata: Optional[dict] = None,
               half: bool = False) -> Path:
    """Write the state dict (Cellpose's keys) atomically; ``metadata`` goes to ``PATH.json``."""
    from .io import atomic_write

    path = Path(path)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() and not k.startswith("diam") else v
                 for k, v in state.items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if metadata is not None:
        text = json.dumps(metadata, indent=1, default=str)
        atomic_write(path.with_suffix(path.suffix + ".json"),
                     lambda tmp: Path(tmp).write_text(text))
    return path
