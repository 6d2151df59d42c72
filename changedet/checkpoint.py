"""Checkpoints as safetensors with JSON metadata: a model knows its name, config, bands and statistics.

Loading never unpickles: tensors come from safetensors and metadata from JSON, so a malicious file
can at worst fail to parse. Legacy ``.pt``/``.pth`` state dicts are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from changedet.normalization import PER_SCENE
from changedet.errors import ModelError
from changedet.io.writers import writing

if TYPE_CHECKING:  # torch is imported by the functions that move tensors: reading metadata needs none
    import torch

METADATA_KEY = "changedet"


def save_checkpoint(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """Write ``model``'s state dict and ``metadata`` (must include ``model`` and ``config``)."""
    from safetensors.torch import save_file

    if "model" not in metadata or "config" not in metadata:
        raise ValueError("checkpoint metadata needs 'model' (registry name) and 'config' (builder kwargs)")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = Path(f"{path}.tmp")
    with writing(tmp):  # a full disk: OSError naming the file (exit 1), and the previous checkpoint kept
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
        tmp.replace(path)


def _check_names(value: Any, what: str) -> None:
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"{what} must be a non-empty list of band names")


def _check_statistics(value: Any) -> None:
    if value == PER_SCENE:
        return
    if not isinstance(value, dict) or set(value) < {"t1", "t2"}:
        raise ValueError(f"'normalization' must be {PER_SCENE!r} or {{t1: {{mean, std}}, t2: {{mean, std}}}}")
    for date in ("t1", "t2"):
        stats = value[date]
        mean, std = (stats.get(k) if isinstance(stats, dict) else None for k in ("mean", "std"))
        numbers = [v for v in (mean or []) + (std or []) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not (isinstance(mean, list) and isinstance(std, list) and mean and len(mean) == len(std)
                and len(numbers) == 2 * len(mean) and all(math.isfinite(v) for v in numbers) and min(std) > 0):
            raise ValueError(f"'normalization.{date}' needs finite 'mean' and positive 'std' lists of one length")


def validate_metadata(metadata: Any) -> dict[str, Any]:
    """Check the fields a checkpoint's metadata must carry; ``ValueError`` with the first problem.

    ``model`` (registry name) is required; ``config`` an object; ``threshold`` a number in [0, 1];
    ``bands`` a list of names or ``{t1: [...], t2: [...]}``; ``normalization`` ``"per-scene"`` or
    per-date mean/std; ``input_channels`` two positive integers; ``channel_names`` a list of names.
    """
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(metadata).__name__}")
    if not isinstance(metadata.get("model"), str) or not metadata["model"]:
        raise ValueError("metadata has no 'model' (registry name of the architecture)")
    if not isinstance(metadata.get("config", {}), dict):
        raise ValueError("'config' must be an object of builder arguments")
    threshold = metadata.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"'threshold' must be a number in [0, 1], got {threshold!r}")
    bands = metadata.get("bands")
    if isinstance(bands, dict):
        for date in ("t1", "t2"):
            _check_names(bands.get(date), f"'bands.{date}'")
    elif bands is not None:
        _check_names(bands, "'bands'")
    if metadata.get("normalization") is not None:
        _check_statistics(metadata["normalization"])
    channels = metadata.get("input_channels")
    if channels is not None and not (isinstance(channels, list) and len(channels) == 2
                                     and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
        raise ValueError(f"'input_channels' must be two positive integers, got {channels!r}")
    if metadata.get("channel_names") is not None:
        _check_names(metadata["channel_names"], "'channel_names'")
    return metadata


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The validated JSON metadata of a checkpoint, without loading tensors (:class:`ModelError` otherwise)."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"checkpoint {path} is a folder: give a .safetensors (or .pt with its .json) file")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix in (".pt", ".pth"):
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise ModelError(f"checkpoint {path} needs its metadata file {sidecar.name}")
        try:
            return validate_metadata(json.loads(sidecar.read_text()))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"invalid checkpoint metadata {sidecar}: {str(exc).splitlines()[0]}") from None
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if not 0 < header_len < 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(header_len))
        metadata = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ModelError(f"{path} is not a changedet safetensors checkpoint") from None
    try:
        return validate_metadata(metadata)
    except ValueError as exc:
        raise ModelError(f"invalid checkpoint metadata in {path}: {exc}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint (safetensors, or a ``.pt`` state dict loaded with ``weights_only=True``)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    try:
        if path.suffix in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
        return load_file(str(path))
    except (SafetensorError, RuntimeError, OSError, EOFError) as exc:
        raise ModelError(f"cannot load weights from {path}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # torch's weights_only unpickler raises UnpicklingError for payloads
        raise ModelError(
            f"refusing to load {path}: not a plain tensor state dict ({type(exc).__name__} from the weights_only loader)"
        ) from None
