"""Checkpoints as safetensors with JSON metadata: a model knows its name, config, bands and statistics.

Loading never unpickles: tensors come from safetensors and metadata from JSON, so a malicious file
can at worst fail to parse. Legacy ``.pt``/``.pth`` state dicts are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from changedet.errors import ModelError

METADATA_KEY = "changedet"


def save_checkpoint(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """Write ``model``'s state dict and ``metadata`` (must include ``model`` and ``config``)."""
    if "model" not in metadata or "config" not in metadata:
        raise ValueError("checkpoint metadata needs 'model' (registry name) and 'config' (builder kwargs)")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = Path(f"{path}.tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix in (".pt", ".pth"):
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise ModelError(f"checkpoint {path} needs its metadata file {sidecar.name}")
        return json.loads(sidecar.read_text())
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if not 0 < header_len < 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(header_len))
        return json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ModelError(f"{path} is not a changedet safetensors checkpoint") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint (safetensors, or a ``.pt`` state dict loaded with ``weights_only=True``)."""
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
