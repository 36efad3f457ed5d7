"""Finding, loading and saving networks: bundled models, user models, Cellpose ``.pth`` files.

A model file is a plain state dict with Cellpose's keys (so we can load Cellpose 2/3 models,
and Cellpose loads ours where they have its widths, nbase 2-32-64-128-256); the architecture is
read back from the tensor shapes, the diameters from the ``diam_mean`` / ``diam_labels``
entries. Bundled weights may be stored in float16 to keep the download small; they always run
in float32. A training checkpoint
``{"state_dict": ..., "optimizer": ..., ...}`` loads too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from cp3d.resources import DEFAULT_MODEL  # defined there (no torch): the app reads it too

from .errors import ModelError
from .net import CPnet, architecture_from_state_dict

log = logging.getLogger("cp3d")

#: suffixes tried after a bare model name (Cellpose's own model files have none)
MODEL_SUFFIXES = (".pth", ".pt", "")
_SIDECAR = ".json"


def bundled_models_dir() -> Path:
    """Models shipped inside the package (read-only)."""
    from cp3d.resources import MODELS_DIR

    return Path(MODELS_DIR)


def user_models_dir() -> Path:
    """Per-user folder for trained models (never inside the install folder).

    ``CP3D_USER_MODELS`` overrides it (tests, portable installs)."""
    env = os.environ.get("CP3D_USER_MODELS")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("cp3d", appauthor=False)) / "models"


def pick_device(use_gpu: bool = False) -> torch.device:
    """CUDA, then Apple MPS, when asked and present; else the CPU (logging why)."""
    if use_gpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        log.warning("GPU asked for but none is available (no CUDA or MPS): running on the CPU")
    return torch.device("cpu")


@dataclass
class ModelInfo:
    name: str
    path: Path
    bundled: bool


@dataclass
class Model:
    """A network ready for inference, with the diameters it was trained for.

    ``diam_mean`` (the diameter images were rescaled to in training), ``diam_labels`` (the mean
    diameter of the training masks) and ``nchan`` are read from ``net`` when not given."""

    net: CPnet
    name: str
    path: Optional[Path] = None
    diam_mean: Optional[float] = None
    diam_labels: Optional[float] = None
    device: Optional[torch.device] = None
    nchan: Optional[int] = None

    def __post_init__(self) -> None:
        if self.diam_mean is None:
            self.diam_mean = float(self.net.diam_mean.item())
        if self.diam_labels is None:
            self.diam_labels = float(self.net.diam_labels.item())
        if self.nchan is None:
            self.nchan = int(self.net.nchan)
        if self.device is None:
            self.device = self.net.device

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, Y, X) float32 -> (flowY, flowX, cellprob as (N, 3, Y, X), style (N, S)).

        Y and X must be multiples of ``net.divisor`` (8 for the default network)."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1] != self.nchan:
            raise ValueError(f"expected (N, {self.nchan}, Y, X), got {batch.shape}")
        self.net.eval()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            out, style = self.net(x)
            return out.float().cpu().numpy(), style.float().cpu().numpy()


# ------------------------------------------------------------------------------------ finding


def list_models() -> list[ModelInfo]:
    """Bundled models first, then the user's, each sorted by name."""
    found = []
    for folder, bundled in ((bundled_models_dir(), True), (user_models_dir(), False)):
        if folder.is_dir():
            files = [p for p in folder.iterdir()
                     if p.is_file() and p.suffix in (".pth", ".pt") and not p.name.startswith(".")]
            found.extend(ModelInfo(p.stem, p, bundled) for p in sorted(files))
    return found


def _available() -> str:
    names = [m.name for m in list_models()]
    return ", ".join(names) if names else "none installed"


def resolve_model_path(name_or_path: Union[str, Path, None]) -> Path:
    """A path as given, or a bundled/user model by name; :class:`ModelError` if none."""
    if name_or_path is None or str(name_or_path) == "":
        for suffix in (".pth", ".pt"):
            path = bundled_models_dir() / f"{DEFAULT_MODEL}{suffix}"
            if path.is_file():
                return path
        raise ModelError(
            f"the default model '{DEFAULT_MODEL}' is not bundled with this installation; "
            f"pass a model name or file (available: {_available()})", bundled_models_dir())
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = (isinstance(name_or_path, Path) or path.suffix in (".pth", ".pt")
                       or "/" in text or os.sep in text or path.exists())
    if looks_like_path:
        if path.is_dir():
            raise ModelError("is a folder, not a model file", path)
        if not path.exists():
            raise ModelError(f"model file not found (installed models: {_available()})", path)
        return path
    for folder in (bundled_models_dir(), user_models_dir()):
        for suffix in MODEL_SUFFIXES:
            candidate = folder / f"{text}{suffix}"
            if candidate.is_file():
                return candidate
    raise ModelError(f"no model named '{text}' (available: {_available()})")


# ------------------------------------------------------------------------------------ loading


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def load_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a state dict safely (``weights_only``, no code runs), accepting a checkpoint too."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError("model file not found", path) from None
    except IsADirectoryError:
        raise ModelError("is a folder, not a model file", path) from None
    except PermissionError:
        raise ModelError("no permission to read the model file", path) from None
    except (EOFError, zipfile.BadZipFile, RuntimeError) as err:
        if path.stat().st_size == 0:
            raise ModelError("model file is empty", path) from None
        raise ModelError(f"not a readable model file: truncated or corrupt "
                         f"({_first_line(err)})", path) from None
    except Exception as err:  # unpickling errors, content refused by weights_only...
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise ModelError(f"refused: the file holds Python objects ({found.group(1)}) "
                             "besides tensors, which are not loaded for safety", path) from None
        raise ModelError("not a PyTorch model file (unrecognised content)", path) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelError("not a network state dict (the file holds other data)", path)
    if all(k.startswith("module.") for k in obj):  # saved from a DataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def net_from_state_dict(state: dict[str, torch.Tensor],
                        path: Union[str, Path, None] = None) -> CPnet:
    """Build the CPnet whose shapes match ``state`` and load it (strict keys), in float32."""
    if any(k.startswith("encoder.") for k in state) and "W2" in state:
        raise ModelError("a Cellpose 4 (Cellpose-SAM) model: only Cellpose 2/3 style networks "
                         "are supported", path)
    try:
        arch = architecture_from_state_dict(state)
    except KeyError:
        raise ModelError("not a Cellpose/cp3d network (unknown layer names)", path) from None
    except (ValueError, IndexError) as err:
        raise ModelError(f"unsupported network ({_first_line(err)})", path) from None
    if arch["nout"] != 3:
        raise ModelError(f"network has {arch['nout']} outputs, expected 3 (flows and cell "
                         "probability); image restoration models are not segmentation models",
                         path)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    diam_mean = float(state["diam_mean"].reshape(-1)[0]) if "diam_mean" in state else 30.0
    net = CPnet(arch["nbase"], arch["nout"], arch["sz"], diam_mean=diam_mean)
    # very old Cellpose files lack the diameters: Cellpose's defaults are diam_mean for both
    state.setdefault("diam_mean", torch.full((1,), diam_mean))
    state.setdefault("diam_labels", torch.full((1,), diam_mean))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        msg = str(err).replace("\n", " ").replace("\t", "")
        raise ModelError(f"weights do not match a Cellpose network ({msg[:200]})", path) from None
    return net.eval()


def load_model(name_or_path: Union[str, Path, None] = None,
               device: Optional[torch.device] = None) -> Model:
    """Load a bundled model by name (default ``cp3d_nuclei``), a user model, or a file.

    Raises :class:`ModelError` (naming the file) if it is missing, unreadable or not a
    Cellpose/cp3d network."""
    path = resolve_model_path(name_or_path)
    net = net_from_state_dict(load_state_dict(path), path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    net.to(device).eval()
    return Model(net=net, name=path.stem if path.suffix in (".pth", ".pt") else path.name,
                 path=path, device=device)


def read_metadata(path: Union[str, Path]) -> dict[str, Any]:
    """The JSON sidecar ``PATH.json`` written by :func:`save_model`, or ``{}``."""
    side = Path(str(path) + _SIDECAR)
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------- saving


def save_model(net: CPnet, path: Union[str, Path], metadata: Optional[dict] = None,
               half: bool = False) -> Path:
    """Write ``net``'s state dict (Cellpose's keys) atomically.

    ``half`` stores float16 weights (half the size; diameters stay float32). ``metadata``
    goes to a JSON sidecar ``PATH.json`` (an older sidecar is removed when there is none).
    Raises :class:`~cp3d.core.errors.OutputError` if the
    folder is not writable."""
    from .io import atomic_write

    path = Path(path)
    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        if half and v.is_floating_point() and not k.startswith("diam"):
            v = v.half()
        state[k] = v.clone()
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    side = Path(str(path) + _SIDECAR)
    if metadata is not None:
        text = json.dumps(metadata, indent=1, default=str)
        atomic_write(side, lambda tmp: Path(tmp).write_text(text))
    elif side.exists():  # it described the model this file replaced
        side.unlink()
    return path


# -------------------------------------------------------------------------------- calibration

N_VIEWS_3D = 3  # YX, ZY, ZX: the 2.5D cell probability is the sum of the three views' logits


def shift_cellprob_threshold(net: CPnet, threshold: float) -> float:
    """Make ``cellprob_threshold=0`` in 3D act as ``threshold`` did, by raising the bias of the
    cell-probability logit by ``-threshold / 3`` (in 2D that acts as a threshold of
    ``threshold / 3``). Why: a model that is too shy on dim objects is mended once, in its
    weights, so users keep Cellpose's default threshold. Returns the bias shift."""
    shift = -float(threshold) / N_VIEWS_3D
    with torch.no_grad():
        net.output[2].bias[2] += shift
    return shift
