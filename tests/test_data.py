import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

import autoft.data.decode as decode_module
import autoft.data.store as store_module
from autoft.backbones import build_model
from autoft.config import Config
from autoft.data.augment import augment, center_crop
from autoft.data.dataset import load_dataset
from autoft.data.decode import decode
from autoft.data.demo import demo_digits
from autoft.data.scan import scan
from autoft.exceptions import DataError


def test_scan_finds_classes_and_ignores_non_images(tmp_path):
    root = make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=4)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    found = scan(root)
    classes, splits = found.classes, found.splits
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
    arr = decode(str(f), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


def test_transparent_pixels_become_white(tmp_path):
    f = tmp_path / "t.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(f)
    assert decode(str(f), 16).min() == 255


def test_decode_keeps_the_centre_square(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, 20:40] = 255  # white centre third of a wide image
    f = tmp_path / "wide.png"
    Image.fromarray(img).save(f)
    out = decode(str(f), 20)
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
    first = load_dataset(root, 16)
    assert first.store.decoded == 14  # 10 train + 4 val

    second = load_dataset(root, 16)
    assert second.store.decoded == 0
    assert torch.equal(first.train.read(), second.train.read())
    import os
    import time

    os.utime(root / "train" / "cat" / "000.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert load_dataset(root, 16).store.decoded == 14  # a changed file invalidates the store


def test_splits_are_rows_of_one_memory_mapped_store(tmp_path):
    root = make_image_folder(tmp_path, per_class=5, splits=("train", "val", "test"))
    ds = load_dataset(root, 16)
    images = ds.store.images
    assert (
        isinstance(images, np.memmap) and images.mode == "r" and images.shape == (18, 3, 18, 18)
    )  # 10 train, 4 val, 4 test at 16 / 0.875
    assert ds.train.store is ds.val.store is ds.test.store is ds.store  # index sets, never copies
    assert sorted(ds.labelled.rows.tolist() + ds.test.rows.tolist()) == list(range(18))
    for split in (ds.train, ds.val, ds.test):
        for i in (0, len(split) - 1):
            expected = decode(split.paths[i], ds.store_size).transpose(2, 0, 1)
            assert np.array_equal(split.read(torch.tensor([i]))[0].numpy(), expected)
    shuffled = torch.tensor([3, 0, 2, 1])  # a batch in any order comes back in that order
    assert torch.equal(ds.train.read(shuffled), ds.train.read()[shuffled])


def test_unreadable_images_get_no_row_and_their_reasons_are_kept_beside_the_store(tmp_path):
    root = make_image_folder(tmp_path, per_class=5, splits=("train",))
    (root / "train" / "cat" / "001.png").write_bytes(b"not a png")
    first = load_dataset(root, 16, skip_bad_images=True)
    again = load_dataset(root, 16, skip_bad_images=True)
    assert again.store.decoded == 0 and again.skipped == first.skipped
    assert list(first.skipped) == [str(root / "train" / "cat" / "001.png")]
    assert first.store.images.shape[0] == 9 and len(first.labelled) == 9
    assert torch.equal(first.labelled.read(), again.labelled.read())
    assert not list((tmp_path.parent).glob("**/.*.tmp"))  # nothing half-written left behind


def test_a_file_name_that_is_not_utf8_is_decoded_and_cached(tmp_path):
    root = make_image_folder(tmp_path, per_class=4, splits=("train",))
    odd = os.fsdecode(b"caf\xe9.png")  # latin-1 from an old zip: not valid UTF-8
    (root / "train" / "cat" / "000.png").rename(root / "train" / "cat" / odd)
    first = load_dataset(root, 16)
    assert any(p.endswith(odd) for p in first.labelled.paths + first.train.paths)
    assert load_dataset(root, 16).store.decoded == 0


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
    root = demo_digits(per_class=3, val_per_class=1)
    found = scan(root)
    classes, splits = found.classes, found.splits
    assert classes == [str(i) for i in range(10)]
    assert len(splits["train"][0]) == 30 and len(splits["val"][0]) == 10


# --- photos as people take them -----------------------------------------------------------------------------


def _upright_portrait(w: int, h: int) -> np.ndarray:
    """A portrait photo as it should look: red top half, blue bottom half."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = (255, 0, 0)
    img[h // 2 :] = (0, 0, 255)
    return img


@pytest.mark.parametrize(
    "orientation, stored_as",
    [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180)],
)
@pytest.mark.parametrize(
    "w, h", [(48, 64), (480, 640)]
)  # 480x640 also goes through JPEG draft (reduced-scale) decoding
def test_exif_orientation_is_applied(tmp_path, orientation, stored_as, w, h):
    """A phone stores the sensor's pixels sideways plus an EXIF Orientation tag; decode must show the photo upright."""
    stored = Image.fromarray(_upright_portrait(w, h)).transpose(stored_as)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = orientation
    f = tmp_path / "phone.jpg"
    stored.save(f, quality=95, exif=exif)
    out = decode(str(f), 32).astype(int)
    assert out.shape == (32, 32, 3)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    for x in (2, 16, 29):  # top rows red and bottom rows blue across the whole width, as the photo was taken
        assert np.abs(out[2, x] - red).max() < 40, out[2, x]
        assert np.abs(out[29, x] - blue).max() < 40, out[29, x]


def test_exif_orientation_in_memory_matches_the_file(tmp_path):
    from autoft.results.predict import _as_file

    exif = Image.Exif()
    exif[0x0112] = 6
    f = tmp_path / "phone.jpg"
    Image.fromarray(_upright_portrait(48, 64)).transpose(Image.Transpose.ROTATE_90).save(f, quality=95, exif=exif)
    with Image.open(f) as im:
        in_memory = decode(_as_file(im), 32)
    np.testing.assert_allclose(in_memory, decode(str(f), 32), atol=8)
    assert in_memory[2, 16, 0] > 200 and in_memory[29, 16, 2] > 200  # upright: red on top, blue below


def _gradient16(mode: str) -> Image.Image:
    a = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    return Image.fromarray(a.astype(np.int32)) if mode == "I" else Image.fromarray(a.astype(np.uint16))


@pytest.mark.parametrize("ext, mode", [(".png", "I;16"), (".tif", "I;16"), (".tif", "I")])
def test_16_bit_greyscale_keeps_its_full_range(tmp_path, ext, mode):
    f = tmp_path / f"g16{ext}"
    _gradient16(mode).save(f)
    with Image.open(f) as im:
        assert im.mode == mode  # what Pillow opens such a file as
    out = decode(str(f), 64)
    assert out.min() <= 2 and out.max() >= 253  # 0..65535 spans 0..255, not clipped at 255/65535
    assert len(np.unique(out)) > 200  # a gradient, not a few grey levels
    assert (out[..., 0] == out[..., 2]).all()
    assert out[0, 0, 0] < out[32, 32, 0] < out[63, 63, 0]


def test_an_I_image_is_scaled_over_its_range():
    im = Image.fromarray(np.arange(-1000, 1560, 10, dtype=np.int32).reshape(16, 16))
    assert im.mode == "I"
    own = decode_module.dataset_range([decode_module.extent(im)])
    assert own == (-1000, 1550)
    assert np.array_equal(np.asarray(decode_module._range_to_l(im, own)), np.arange(256).reshape(16, 16))
    wider = np.asarray(decode_module._range_to_l(im, (-1000, 4100)))  # a dataset's range: values keep their grey
    assert wider.max() == round(2550 * 255 / 5100) and wider.min() == 0


def test_decode_cache_key_version_changed():
    """Caches decoded before EXIF orientation and 16-bit support hold wrong pixels; they must not be reused."""
    import hashlib

    old = [hashlib.sha1(f"v{v}:16".encode()).hexdigest() for v in (1, 2, 3, 4)]  # v3: I and F decoded black;
    # v4: each I and F image over its own range
    assert store_module._store_key([], 16) not in old


def _bmp(path, value: int) -> None:
    """A 24 x 24 grey BMP: the same file size whatever its pixels (as `cp -p new.bmp old.bmp` needs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), (value,) * 3).save(path)


def _replace_in_place(old, new) -> None:
    """`cp -p new old` where new has old's modification time (rsync -t, a restore): size and mtime stay."""
    before = os.stat(old)
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
    shutil.copy2(new, old)
    after = os.stat(old)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("change_time", [True, False])  # False: a file system without ctime (a content digest)
def test_a_file_replaced_in_place_is_decoded_again(tmp_path, monkeypatch, change_time):
    monkeypatch.setattr(store_module, "CHANGE_TIME", change_time)
    for c, v in (("black", 0), ("white", 255)):
        for i in range(3):
            _bmp(tmp_path / "d" / "train" / c / f"{i}.bmp", v)
    first = load_dataset(tmp_path / "d", 16)
    assert load_dataset(tmp_path / "d", 16).store.decoded == 0  # untouched: not decoded again
    _bmp(tmp_path / "new.bmp", 255)
    _replace_in_place(tmp_path / "d" / "train" / "black" / "0.bmp", tmp_path / "new.bmp")
    again = load_dataset(tmp_path / "d", 16)
    assert again.store.decoded == 6 and again.store.file != first.store.file
    row = again.store.rows[str(tmp_path / "d" / "train" / "black" / "0.bmp")]
    assert again.store.images[row].min() == 255  # the new pixels, not the old store's black
    assert load_dataset(tmp_path / "d", 16).store.decoded == 0


def _brightness_net():
    """tiny_cnn wired by hand to say 'white' for bright images and 'black' for dark ones (no training)."""
    net, _ = build_model("tiny_cnn", 2, weights="random")
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 4:  # each conv passes the sum of its input channels (first) or channel 0 (later) on
                p.zero_()
                p[0, :, 1, 1] = 1.0 if p.shape[1] == 3 else 0.0
                p[0, 0, 1, 1] = 1.0
        net.head.weight.zero_()
        net.head.weight[1, 0] = 1.0
        net.head.bias.copy_(torch.tensor([0.5, 0.0]))
    return net


def test_evaluate_scores_the_replaced_pixels(tmp_path):
    from autoft.results.predict import evaluate
    from autoft.training.checkpoint import save_checkpoint

    root = tmp_path / "d"
    for split in ("train", "val"):
        for c, v in (("black", 0), ("white", 255)):
            for i in range(2):
                _bmp(root / split / c / f"{i}.bmp", v)
    cfg = Config(data=str(root), backbone="tiny_cnn", image_size=32, device="cpu")
    save_checkpoint(tmp_path / "m.pt", [_brightness_net().state_dict()], ["black", "white"], cfg)
    assert evaluate(tmp_path / "m.pt", split="val", device="cpu")["accuracy"] == 1.0
    _bmp(tmp_path / "new.bmp", 255)
    for i in range(2):  # both black val images now hold white pixels
        _replace_in_place(root / "val" / "black" / f"{i}.bmp", tmp_path / "new.bmp")
    assert evaluate(tmp_path / "m.pt", split="val", device="cpu")["accuracy"] == 0.5


def _link(link, target):
    link.symlink_to(target, target_is_directory=True)


@pytest.mark.parametrize("target", [".", "..", "../..", "cat", "../val", "../val/dog"])  # relative to train/
def test_class_folder_linked_into_the_dataset_is_refused(tmp_path, target):
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    _link(root / "train" / "bird", target)  # a third class that is a link back into the dataset
    with pytest.raises(DataError) as err:
        scan(root)
    msg = str(err.value)
    assert "\n" not in msg and str(root / "train" / "bird") in msg and "not a link" in msg


def test_class_folder_linked_to_train_itself_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=3)
    _link(root / "train" / "all", root / "train")
    with pytest.raises(
        DataError, match=r"class folder .*train/all resolves to .*train, the train/ folder itself"
    ) as err:
        scan(root)
    assert "\n" not in str(err.value)


def test_links_to_unrelated_folders_and_link_cycles_are_fine(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=("bird",), per_class=3, splits=("train",))
    _link(root / "train" / "bird", elsewhere / "train" / "bird")
    _link(root / "train" / "cat" / "loop", "..")  # a cycle inside a class folder: not followed, no endless walk
    _link(root / "train" / "dog" / "self", ".")
    import shutil

    shutil.rmtree(root / "val" / "cat")
    _link(root / "val" / "cat", root / "train" / "cat")  # same class in another split: labels agree, allowed
    found = scan(root)
    classes, splits = found.classes, found.splits
    assert classes == ["bird", "cat", "dog"]
    paths, labels = splits["train"]
    assert len(paths) == 9 and labels.count(0) == 3
    assert all("loop" not in p and "self" not in p for p in paths)
