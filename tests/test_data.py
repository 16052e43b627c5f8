import numpy as np
import pytest
import torch
from PIL import Image

import autoft.data as data
from autoft.data import augment, center_crop, load_dataset, scan
from autoft.exceptions import DataError
from conftest import make_image_folder


def test_scan_finds_classes_and_ignores_non_images(tmp_path):
    root = make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=4)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    classes, splits = scan(root)
    assert classes == ["a", "b", "c"]
    paths, labels = splits["train"]
    assert len(paths) == 12 and sorted(set(labels)) == [0, 1, 2]
    assert not any(p.endswith(".txt") for p in paths)
    assert "val" in splits and "test" not in splits


def test_without_val_a_seeded_stratified_split_is_made(tmp_path):
    root = make_image_folder(tmp_path, classes=("a", "b"), per_class=20, splits=("train",))
    ds = load_dataset(root, 16, seed=3, val_fraction=0.25)
    assert len(ds.train) == 30 and len(ds.val) == 10
    assert torch.bincount(ds.val.labels).tolist() == [5, 5]  # stratified
    assert not set(ds.train.paths) & set(ds.val.paths)
    again = load_dataset(root, 16, seed=3, val_fraction=0.25)
    assert again.val.paths == ds.val.paths  # same seed, same split
    other = load_dataset(root, 16, seed=4, val_fraction=0.25)
    assert other.val.paths != ds.val.paths


def test_test_split_is_loaded_when_present(tmp_path):
    root = make_image_folder(tmp_path, per_class=4, splits=("train", "val", "test"))
    ds = load_dataset(root, 16)
    assert ds.test is not None and len(ds.test) == 4


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    f = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    Image.new("RGB", (20, 30), (200, 40, 40)).convert(mode).save(f)
    arr = data.decode(str(f), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


def test_transparent_pixels_become_white(tmp_path):
    f = tmp_path / "t.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(f)
    assert data.decode(str(f), 16).min() == 255


def test_decode_keeps_the_centre_square(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, 20:40] = 255  # white centre third of a wide image
    f = tmp_path / "wide.png"
    Image.fromarray(img).save(f)
    out = data.decode(str(f), 20)
    assert out.shape == (20, 20, 3) and out.mean() > 240


def test_missing_folder_one_class_and_empty_class_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nope")
    one = make_image_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="at least two"):
        scan(one)
    empty = make_image_folder(tmp_path / "empty")
    (empty / "train" / "ghost").mkdir()
    with pytest.raises(DataError, match="ghost"):
        scan(empty)


def test_unreadable_images_are_listed_or_skipped(tmp_path):
    root = make_image_folder(tmp_path, per_class=6)
    bad = root / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(DataError) as err:
        load_dataset(root, 16)
    assert "broken.jpg" in str(err.value) and "--skip-bad-images" in str(err.value)
    ds = load_dataset(root, 16, skip_bad_images=True)
    assert list(ds.skipped) == [str(bad)]
    assert len(ds.train) == 12  # 6 per class; the broken file is left out


def test_second_load_decodes_nothing(tmp_path):
    root = make_image_folder(tmp_path, per_class=5)
    before = data.decode_count
    first = load_dataset(root, 16)
    assert data.decode_count - before == 14  # 10 train + 4 val
    data._MEMORY.clear()  # as in a new process: only the disk cache is left
    second = load_dataset(root, 16)
    assert data.decode_count - before == 14
    assert torch.equal(first.train.images, second.train.images)
    (root / "train" / "cat" / "000.png").touch()  # a changed file invalidates the cache
    import os, time
    os.utime(root / "train" / "cat" / "000.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    load_dataset(root, 16)
    assert data.decode_count - before == 28


def test_strength_zero_is_exactly_the_eval_transform():
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    eval_view = center_crop(x, 32)
    assert torch.equal(augment(x, 32, 0.0), eval_view)
    general = augment(x, 32, 0.0, force=True)  # the sampling path itself lands on the same pixels
    assert torch.allclose(general, eval_view, atol=1e-5)


def test_augmentation_is_per_sample_and_scales_with_strength():
    x = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8).repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    weak = augment(x, 32, 0.1, g)
    strong = augment(x, 32, 1.0, g)
    ref = center_crop(x, 32)
    assert weak.shape == strong.shape == (8, 3, 32, 32)
    assert not torch.allclose(strong[0], strong[1])  # each sample gets its own crop
    assert (strong - ref).abs().mean() > (weak - ref).abs().mean()
    assert strong.min() >= 0 and strong.max() <= 1


def test_demo_digits_is_built_offline():
    root = data.demo_digits(per_class=3, val_per_class=1)
    classes, splits = scan(root)
    assert classes == [str(i) for i in range(10)]
    assert len(splits["train"][0]) == 30 and len(splits["val"][0]) == 10
