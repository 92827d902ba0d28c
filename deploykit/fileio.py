"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write data to path through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; these are ordinary shareable files
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_versioned_json(path: str | os.PathLike, fmt: str, version: int, what: str, fix: str) -> dict:
    """A JSON document whose "format" is fmt and "format_version" is version; every failure is one line naming `fix`."""
    import json

    from .errors import DeployKitError

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeployKitError(f"{what} not found: {path}: {fix}") from None
    except (OSError, ValueError) as e:
        raise DeployKitError(f"cannot read {what} {path} ({type(e).__name__}): {fix}") from None
    return check_format(doc, path, fmt, version, what, fix)


def check_format(doc: object, path: str | os.PathLike, fmt: str, version: int, what: str, fix: str) -> dict:
    """doc, if it is a dict whose "format" is fmt and "format_version" is version; else one line naming `fix`."""
    from .errors import DeployKitError

    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise DeployKitError(f"{path} is not a deploykit {what}: {fix}")
    if doc.get("format_version") != version:
        raise DeployKitError(f"{what} {path} has format_version {doc.get('format_version')!r}, this deploykit reads "
                             f"{version}: {fix}")
    return doc


def save_checkpoint(path: str | os.PathLike, doc: dict) -> Path:
    """A training checkpoint (tensors, numbers, strings, lists, dicts) written atomically with torch.save."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(doc, buf)
    return atomic_write(path, buf.getvalue())


def load_checkpoint_doc(path: str | os.PathLike, fmt: str, version: int, what: str, fix: str) -> dict:
    """A checkpoint of save_checkpoint, loaded with weights_only=True (no pickle code runs); every failure is one line."""
    import pickle

    import torch

    from .errors import DeployKitError

    path = Path(path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DeployKitError(f"{what} not found: {path}: {fix}") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # damaged, truncated, empty, foreign
        raise DeployKitError(f"cannot read {what} {path} ({type(e).__name__}): {fix}") from None
    return check_format(doc, path, fmt, version, what, fix)
