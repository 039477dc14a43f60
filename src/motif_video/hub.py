"""Resolving a model reference (a local folder or a hub id) to a local folder, failing fast without network."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
ASSETS = Path(__file__).resolve().parent / "assets"
# Models shipped in the package, by name: the nano model (the default) and its distilled 4-step student.
BUILTIN_MODELS = ("motif-video-nano", "motif-video-nano-fast")


def builtin_model_dir(name: str) -> Path | None:
    """The shipped folder of a built-in model name, or None when `name` is not one (or not in this install)."""
    folder = ASSETS / name
    return folder if name in BUILTIN_MODELS and (folder / "model_index.json").is_file() else None


def resolve_model_dir(ref: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local folder as is; a built-in model name; a hub id from the local HF cache, else downloaded; else one
    clear error."""
    path = Path(ref).expanduser()
    if not path.exists() and builtin_model_dir(str(ref)) is not None:
        path = builtin_model_dir(str(ref))
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a model folder")
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointError(f"{path} is not a model folder: it has no '{subfolder}/' subfolder")
        return folder
    ref = str(ref)
    if not _HUB_ID.match(ref):
        if ref in BUILTIN_MODELS:
            raise CheckpointError(f"the built-in model {ref} is not shipped in this installation")
        raise CheckpointError(f"model folder not found: {ref} (built-in models: {', '.join(BUILTIN_MODELS)})")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of diffusers
        raise CheckpointError(f"{ref} is not a local folder and huggingface_hub is not installed") from None
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        root = snapshot_download(ref, allow_patterns=patterns, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            root = None
        else:
            try:
                root = snapshot_download(ref, allow_patterns=patterns, etag_timeout=5)
            except Exception:
                root = None
    if root is None:
        raise CheckpointError(
            f"cannot get '{ref}': not in the local Hugging Face cache and the hub is unreachable. Download it where "
            f"there is network (`huggingface-cli download {ref} --local-dir DIR`) and pass the folder DIR instead"
        )
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise CheckpointError(f"hub repo {ref} has no '{subfolder}/' folder")
    return folder
