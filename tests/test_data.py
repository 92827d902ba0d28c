"""Datasets: the built-in digits, .npz files and image folders give the same normalised, stratified splits; bad inputs
fail with one line that names the fix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deploykit.data import DataSplit, load_dataset, stratified_split
from deploykit.errors import DeployKitError


pytestmark = pytest.mark.usefixtures("one_thread")


def small_images(seed: int = 0, n_per_class: int = 6, labels=(3, 7, 9), side: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images whose mean brightness depends on the class, and their labels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(labels), n_per_class)
    x = np.clip(rng.normal(60 + 40 * np.arange(len(labels)).repeat(n_per_class)[:, None, None, None], 30,
                           size=(len(y), side, side, 3)), 0, 255).astype(np.uint8)
    return x, y


def assert_same_split(a: DataSplit, b: DataSplit) -> None:
    for name in ("train_x", "train_y", "val_x", "val_y"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-5, msg=name)
    assert (a.num_classes, a.class_names) == (b.num_classes, b.class_names)


# -- digits ------------------------------------------------------------------------------------

def test_digits_shapes_and_classes(digits):
    assert digits.train_x.shape[1:] == (3, 32, 32) and digits.val_x.shape[1:] == (3, 32, 32)
    assert len(digits.train_x) + len(digits.val_x) == 1797  # every image once
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert digits.num_classes == 10 and digits.class_names == tuple(str(i) for i in range(10))
    assert digits.resolution == 32 and digits.source == "digits"
    # grey digits replicated to the 3 input channels the spaces' stems take
    torch.testing.assert_close(digits.train_x[:, 0], digits.train_x[:, 2])


def test_digits_normalised_with_training_statistics(digits):
    mean = digits.train_x.mean(dim=(0, 2, 3))
    std = digits.train_x.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-3, rtol=0)
    # the validation split uses the training statistics, so it is close to but not exactly standardised
    assert abs(float(digits.val_x.mean())) < 0.1
    assert 0 < digits.std[0] < 1 and 0 < digits.mean[0] < 1  # in [0, 1] pixel units


def test_digits_split_is_stratified(digits):
    train_counts = torch.bincount(digits.train_y, minlength=10).float()
    val_counts = torch.bincount(digits.val_y, minlength=10).float()
    frac = val_counts / (train_counts + val_counts)
    assert float(frac.min()) > 0.18 and float(frac.max()) < 0.22, frac


def test_split_is_deterministic_in_seed(digits):
    again = load_dataset("digits", 32, seed=0)
    assert_same_split(digits, again)
    other = load_dataset("digits", 32, seed=1)
    assert not torch.equal(digits.val_y, other.val_y)


def test_stratified_split_partitions_every_class():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 1, 0, 0]  # round(n * 0.2), one stays in training
    t2, v2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)


def test_resolution_resizes(digits):
    d = load_dataset("digits", 16)
    assert d.train_x.shape[1:] == (3, 16, 16)
    assert torch.equal(d.train_y, digits.train_y)  # the split does not depend on the resolution


# -- .npz files and image folders ----------------------------------------------------------------

def test_npz_layouts_round_trip(tmp_path):
    x, y = small_images()
    layouts = {"nhwc": x, "nchw": np.moveaxis(x, -1, 1).copy(), "float": x.astype(np.float32) / 255.0}
    splits = {}
    for name, arr in layouts.items():
        np.savez(tmp_path / f"{name}.npz", x=arr, y=y)
        splits[name] = load_dataset(tmp_path / f"{name}.npz", 16, seed=2)
    d = splits["nhwc"]
    assert d.num_classes == 3 and d.class_names == ("3", "7", "9")
    assert d.train_x.shape[1:] == (3, 16, 16) and len(d.train_x) + len(d.val_x) == len(y)
    assert set(d.train_y.tolist()) == {0, 1, 2}
    assert_same_split(d, splits["nchw"])
    assert_same_split(d, splits["float"])  # uint8 / 255 and the same floats give the same tensors


def test_npz_grey_images(tmp_path):
    x, y = small_images()
    np.savez(tmp_path / "grey.npz", x=x[..., 0], y=y)
    d = load_dataset(tmp_path / "grey.npz", 12)
    assert d.train_x.shape[1:] == (3, 12, 12)
    torch.testing.assert_close(d.train_x[:, 0], d.train_x[:, 1])


def test_image_folder_matches_npz(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    x, y = small_images()
    root = tmp_path / "folder"
    for i, (img, label) in enumerate(zip(x, y)):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"class{label}" / f"{i:03d}.png")  # PNG is lossless
    (root / "class3" / "notes.txt").write_text("not an image, ignored")
    np.savez(tmp_path / "same.npz", x=x, y=y)
    folder = load_dataset(root, 16, seed=5)
    npz = load_dataset(tmp_path / "same.npz", 16, seed=5)
    assert folder.class_names == ("class3", "class7", "class9")
    assert folder.source == str(root)
    for name in ("train_x", "train_y", "val_x", "val_y"):
        torch.testing.assert_close(getattr(folder, name), getattr(npz, name), rtol=0, atol=1e-5)


def test_image_folder_mixed_sizes_and_modes(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for c, size, mode in (("a", (20, 12), "L"), ("b", (7, 9), "RGB"), ("b", (30, 30), "RGBA")):
        (tmp_path / c).mkdir(exist_ok=True)
        for i in range(3):
            Image.new(mode, size, color=(40 * i if mode == "L" else (40 * i, 10, 200, 255)[:len(mode)])).save(
                tmp_path / c / f"{mode}{i}.png")
    d = load_dataset(tmp_path, 8)
    assert d.train_x.shape[1:] == (3, 8, 8) and len(d.train_x) + len(d.val_x) == 9


# -- errors --------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(DeployKitError, match="not found: give 'digits', a .npz file"):
        load_dataset(tmp_path / "nope", 32)


def test_empty_directory(tmp_path):
    with pytest.raises(DeployKitError, match="is empty: put the images of each class in a sub-folder"):
        load_dataset(tmp_path, 32)


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DeployKitError, match="has no class sub-folders"):
        load_dataset(tmp_path, 32)


def test_class_folder_without_images(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DeployKitError, match=r"class folder .*cat has no readable images .*add images or remove the folder"):
        load_dataset(tmp_path, 32)


def test_unreadable_image(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "ok.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DeployKitError, match=r"cannot read image .*broken.png .*replace or remove the file"):
        load_dataset(tmp_path, 32)


def test_single_class_folder(tmp_path):
    (tmp_path / "only").mkdir()
    with pytest.raises(DeployKitError, match="at least 2 class sub-folders"):
        load_dataset(tmp_path, 32)


def test_unreadable_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"garbage, not a zip archive")
    with pytest.raises(DeployKitError, match=r"cannot read .*bad.npz as a .npz archive .*numpy.savez\(path, x=images, y=labels"):
        load_dataset(tmp_path / "bad.npz", 32)


def test_npz_missing_key(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8)), y=np.arange(4))
    with pytest.raises(DeployKitError, match=r"has arrays \['images', 'y'\] but lacks \['x'\]"):
        load_dataset(tmp_path / "d.npz", 32)


def test_npz_mismatched_lengths(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8)), y=np.arange(3))
    with pytest.raises(DeployKitError, match="x holds 4 images but y 3 labels: give one label per image"):
        load_dataset(tmp_path / "d.npz", 32)


def test_npz_one_class(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8)), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(DeployKitError, match="has 1 class: a classifier needs at least 2 classes"):
        load_dataset(tmp_path / "d.npz", 32)


def test_npz_bad_shapes_and_labels(tmp_path):
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 8, 8, 8, 2)), y=np.arange(4))
    with pytest.raises(DeployKitError, match=r"give \(N,H,W\), \(N,H,W,C\) or \(N,C,H,W\)"):
        load_dataset(tmp_path / "shape.npz", 32)
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 8, 8)), y=np.array([0.5, 1, 2, 3]))
    with pytest.raises(DeployKitError, match="y must be a 1-D array of integer labels"):
        load_dataset(tmp_path / "labels.npz", 32)


def test_bad_arguments():
    with pytest.raises(DeployKitError, match="resolution must be an integer"):
        load_dataset("digits", 0)
    with pytest.raises(DeployKitError, match="val_fraction must lie strictly between 0 and 1"):
        load_dataset("digits", 32, val_fraction=1.0)


def test_too_small_for_validation(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8)), y=np.arange(2))
    with pytest.raises(DeployKitError, match="too small for a validation split"):
        load_dataset(tmp_path / "d.npz", 8)
