"""Image-classification datasets as normalised NCHW float tensors, split into training and validation.

`load_dataset(source, resolution)` reads one of three sources and returns a `DataSplit`:
- `"digits"`: scikit-learn's 1,797 real 8x8 handwritten digits (bundled with scikit-learn, no download);
- a `.npz` file with arrays `x` (N,H,W / N,H,W,C / N,C,H,W; uint8 in 0..255 or float) and `y` (N integer labels);
- a folder with one sub-folder of images per class (read with Pillow).

Every source goes through the same steps, so the three behave alike: values to [0, 1] (uint8 / 255),
grey images replicated to 3 channels (the search spaces' stem takes RGB), a stratified split that is
a function of `seed` only, bilinear resizing to `resolution`, and per-channel normalisation with the
mean and standard deviation of the training split alone (the validation split must not leak into it).
The statistics are kept in the split, so images seen at deployment can be normalised the same way.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DeployKitError

BUILTIN = ("digits",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA (alpha dropped)
_SOURCES_HINT = "give 'digits', a .npz file with arrays x and y, or a folder with one sub-folder of images per class"
_NPZ_HINT = "write it with numpy.savez(path, x=images, y=labels)"


@dataclass
class DataSplit:
    """Training and validation tensors: x float32 (N, 3, R, R) normalised, y int64 class indices in 0..num_classes-1."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    source: str
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # per channel, of the training split, in [0, 1] pixel units
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @property
    def resolution(self) -> int:
        return int(self.train_x.shape[-1])


def load_dataset(source: str | os.PathLike, resolution: int, *, seed: int = 0, val_fraction: float = 0.2) -> DataSplit:
    """Read `source`, split it stratified by class (deterministic in `seed`), resize and normalise it."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 4 <= resolution <= 1024:
        raise DeployKitError(f"resolution must be an integer in 4..1024, got {resolution!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise DeployKitError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    name = os.fspath(source)
    if name == "digits":
        images, labels, class_names = _digits()
    else:
        path = Path(name)
        if not path.exists():
            raise DeployKitError(f"dataset {name!r} not found: {_SOURCES_HINT}")
        if path.is_dir():
            images, labels, class_names = _image_folder(path, resolution)
        else:
            images, labels, class_names = _npz(path)
    return _finish(images, labels, class_names, name, resolution, seed, float(val_fraction))


# -- sources: each returns images (N, C, H, W) float32 in [0, 1] (or as given for float arrays), labels, class names ----

def _digits() -> tuple[torch.Tensor, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    return images, d.target.astype(np.int64), tuple(str(t) for t in d.target_names)


def _npz(path: Path) -> tuple[torch.Tensor, np.ndarray, tuple[str, ...]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = sorted(f.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise DeployKitError(f"{path} has arrays {keys} but lacks {missing}: {_NPZ_HINT}")
            x, y = f["x"], f["y"]
    except DeployKitError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DeployKitError(f"cannot read {path} as a .npz archive ({type(e).__name__}): {_NPZ_HINT}") from None
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DeployKitError(f"{path}: y must be a 1-D array of integer labels, got dtype {y.dtype} shape {y.shape}: {_NPZ_HINT}")
    if len(x) != len(y):
        raise DeployKitError(f"{path}: x holds {len(x)} images but y {len(y)} labels: give one label per image")
    if len(y) == 0:
        raise DeployKitError(f"{path} holds no images: {_NPZ_HINT}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DeployKitError(f"{path}: x must hold numbers (uint8 0..255 or float), got dtype {x.dtype}")
    images = _to_nchw(x, path)
    classes, labels = np.unique(y.astype(np.int64), return_inverse=True)
    return images, labels.reshape(-1), tuple(str(c) for c in classes)


def _to_nchw(x: np.ndarray, path: Path) -> torch.Tensor:
    """Layouts (N,H,W), (N,H,W,C) and (N,C,H,W), C in 1/3/4; integers are 0..255 pixels, floats are kept as given."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in _CHANNEL_COUNTS:  # channels-last, the way images are usually stored
        x = np.moveaxis(x, -1, 1)
    elif not (x.ndim == 4 and x.shape[1] in _CHANNEL_COUNTS):
        raise DeployKitError(f"{path}: x has shape {x.shape}: give (N,H,W), (N,H,W,C) or (N,C,H,W) with C = 1, 3 or 4")
    scale = 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    out = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) / scale
    if not torch.isfinite(out).all():
        raise DeployKitError(f"{path}: x holds NaN or infinite values: replace them before training")
    return out


def _image_folder(root: Path, resolution: int) -> tuple[torch.Tensor, np.ndarray, tuple[str, ...]]:
    # Images of a folder differ in size: each is resized on reading, so _finish gets one stack.
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DeployKitError("reading an image folder needs Pillow: `pip install pillow`, or save the images as a .npz "
                             "file with arrays x and y") from None
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        what = "is empty" if not any(root.iterdir()) else "has no class sub-folders"
        raise DeployKitError(f"dataset folder {root} {what}: put the images of each class in a sub-folder named after it")
    if len(class_dirs) < 2:
        raise DeployKitError(f"dataset folder {root} has 1 class ({class_dirs[0].name}): a classifier needs at least 2 "
                             "class sub-folders")
    images, labels = [], []
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.startswith("."))
        if not files:
            raise DeployKitError(f"class folder {d} has no readable images ({', '.join(IMAGE_SUFFIXES)}): add images or "
                                 "remove the folder")
        for f in files:
            try:
                with Image.open(f) as im:
                    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise DeployKitError(f"cannot read image {f} ({type(e).__name__}): replace or remove the file") from None
            t = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0
            images.append(_resize(t, resolution))
            labels.append(label)
    return torch.cat(images), np.asarray(labels, dtype=np.int64), tuple(d.name for d in class_dirs)


# -- the common steps --------------------------------------------------------------------------

def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    shrink = min(x.shape[-2:]) > resolution  # antialiasing only matters when shrinking
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, round(n * val_fraction) images to validation (at least one stays in training); both shuffled."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(int(round(len(idx) * val_fraction)), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def _finish(images: torch.Tensor, labels: np.ndarray, class_names: tuple[str, ...], source: str, resolution: int,
            seed: int, val_fraction: float) -> DataSplit:
    if len(class_names) < 2:
        raise DeployKitError(f"dataset {source!r} has {len(class_names)} class: a classifier needs at least 2 classes")
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if len(val_idx) == 0:
        raise DeployKitError(f"dataset {source!r} is too small for a validation split ({len(labels)} images): add images "
                             "or raise val_fraction")
    x = _resize(images, resolution)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]  # RGBA: the alpha channel carries no class information the networks could use
    train_x, val_x = x[torch.from_numpy(train_idx)], x[torch.from_numpy(val_idx)]
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3))
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant channel stays constant, not NaN

    def norm(t: torch.Tensor) -> torch.Tensor:
        return ((t - mean[None, :, None, None]) / std[None, :, None, None]).contiguous()

    y = torch.from_numpy(labels.astype(np.int64))
    return DataSplit(train_x=norm(train_x), train_y=y[torch.from_numpy(train_idx)], val_x=norm(val_x),
                     val_y=y[torch.from_numpy(val_idx)], num_classes=len(class_names), class_names=tuple(class_names),
                     source=source, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
