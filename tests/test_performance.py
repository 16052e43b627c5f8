"""What makes a search cheap: work done once per process, bounded caches, nothing kept between trials.

Behaviour only; speed figures live in benchmarks/.
"""

import gc
from pathlib import Path

import pytest
import torch

import autoft.training.inference as inference
import autoft.training.loop as ft
from autoft.backbones import _REGISTRY, Net, build_model, register_backbone
from autoft.cache import Images, RunCache, Streamed, load_data
from autoft.study.run import SearchOptions, run_search
from autoft.training.loop import finetune


@pytest.fixture
def prefix_images(monkeypatch):
    """Images pushed through a frozen prefix (stages[0:k] with k short of the whole model), per call."""
    calls = []
    features = Net.features

    def spy(self, x, end, start=0):
        if start == 0 and end < len(self.stages):
            calls.append(len(x))
        return features(self, x, end, start)

    monkeypatch.setattr(Net, "features", spy)
    return calls


@pytest.fixture
def counting_backbone():
    """tiny_cnn under a fresh name whose weight loading counts how often it runs."""
    builds = []

    def build(weights):
        builds.append(weights)
        return _REGISTRY["tiny_cnn"].build(weights)

    register_backbone("counting_cnn", stages=3, mean=(0.5,) * 3, std=(0.5,) * 3)(build)
    yield builds
    _REGISTRY.pop("counting_cnn")


def test_frozen_features_are_computed_once_across_epochs_and_trials(tiny_config, prefix_images):
    cfg = tiny_config.replace(freeze_depth=2, aug_strength=0.0, epochs=3)
    data, cache = load_data(cfg), RunCache()
    finetune(cfg, data, cache=cache)
    finetune(cfg.replace(seed=1, head_lr=0.01), data, cache=cache)  # another trial, same frozen prefix
    # the plain images and their mirror images (test-time augmentation's check), once each: not 2 trials x 3 epochs
    assert sum(prefix_images) == 2 * (len(data.train) + len(data.val))


def test_augmented_trials_still_reuse_validation_features(tiny_config, prefix_images):
    cfg = tiny_config.replace(freeze_depth=1, aug_strength=0.5, epochs=3)
    data, cache = load_data(cfg), RunCache()
    finetune(cfg, data, cache=cache)
    finetune(cfg, data, cache=cache)
    # Augmented training batches need the prefix every step (each fold its own training images); every
    # labelled image goes through it once, for the validation of whichever fold holds it out, and once mirrored
    # (test-time augmentation's check).
    folds = ft.plan_folds(cfg, data)
    assert sum(prefix_images) == 2 * 3 * sum(len(f.train) for f in folds) + 2 * len(data.labelled)


def test_feature_cache_stays_under_its_bound_and_evicts_oldest(tiny_config, monkeypatch):
    cfg = tiny_config
    data = load_data(cfg)
    model, spec = build_model(cfg.backbone, 2)
    dev = torch.device("cpu")
    images = Images(data.val, dev)
    one = inference.frozen_features(model, spec, cfg, images, 1, dev, RunCache())  # (N, 8, 16, 16) floats
    bound = int(one.numel() * one.element_size() * 1.2)
    cache = RunCache(max_bytes=bound)
    inference.frozen_features(model, spec, cfg, images, 1, dev, cache)
    kept = inference.frozen_features(
        model, spec, cfg, images, 2, dev, cache
    )  # half the size: depth 1 must go to make room
    assert cache.held_bytes() <= bound
    assert [k[4] for k in cache.held_keys()] == [2]
    assert inference.frozen_features(model, spec, cfg, images, 2, dev, cache) is kept


def test_features_larger_than_the_bound_are_never_materialised(tiny_config, monkeypatch):
    cfg = tiny_config.replace(freeze_depth=1, aug_strength=0.0, epochs=2)
    data = load_data(cfg)
    model, spec = build_model(cfg.backbone, 2)
    allocated = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or empty(*a, **k))
    cache = RunCache(max_bytes=1000)  # smaller than one split's features
    assert (
        inference.frozen_features(
            model, spec, cfg, Images(data.train, torch.device("cpu")), 1, torch.device("cpu"), cache
        )
        is None
    )
    assert not allocated and not cache.held_keys()
    result = finetune(cfg, data, cache=cache)  # falls back to running the prefix per batch
    assert len(result.history) == 2 and [k[0] for k in cache.held_keys()] == ["stages"]  # no features


def test_weights_are_read_once_per_run_and_each_trial_gets_its_own_copy(tiny_config, counting_backbone):
    cfg = tiny_config.replace(backbone="counting_cnn", epochs=1, freeze_depth=0)
    data, cache = load_data(cfg), RunCache()
    first = finetune(cfg, data, cache=cache)
    second = finetune(cfg, data, cache=cache)
    assert counting_backbone == [None]  # built (weights read) once for both trials
    pristine, _ = cache.pretrained_stages("counting_cnn", None)
    trained = first.state_dict
    # Training changed the trial's copy, never the run's pretrained stages the next trial copies.
    key = "stages.0.0.weight"
    assert not torch.equal(trained[key], pristine[0][0].weight)
    assert first.history[0]["val_loss"] == second.history[0]["val_loss"]  # same seed, same pristine start


def _live_tensor_bytes(cache: RunCache) -> int:
    """Bytes of every distinct tensor storage alive, less what the run's cache holds (bounded, tested above)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no deprecation proxies poked
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values()) - cache.held_bytes()


@pytest.mark.slow
def test_memory_does_not_grow_from_trial_to_trial(tmp_path, tiny_config, monkeypatch):
    """The CPU proxy for 'GPU memory is released between trials': live tensor bytes at each trial's start."""
    import autoft.study.objective as objective_module

    monkeypatch.chdir(tmp_path)

    at_start = []

    def measured(cfg, data=None, report=None, folds=None, cache=None, **kwargs):
        at_start.append(_live_tensor_bytes(cache))
        return ft.finetune(cfg, data, report, folds, cache, **kwargs)

    monkeypatch.setattr(objective_module, "finetune", measured)
    run_search(tiny_config.replace(epochs=1), SearchOptions(trials=10, progress=False, sampler="random", pruner="none"))
    assert len(at_start) == 10
    # Trials hold a model, optimizer state and best weights: any of them kept past its trial would add up.
    assert max(at_start[2:]) <= at_start[1] + 64 * 1024, at_start


def test_caches_stay_bounded_when_backbones_alternate(tiny_config, monkeypatch):
    """Datasets per backbone crop and size, features per backbone/size/depth: both bounded, oldest out first."""
    from autoft.backbones import _REGISTRY

    register_backbone(
        "tiny_cnn_b",
        stages=3,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        crop_pct=0.75,
        native_size=32,
        offline=True,
        pretrained=False,
    )(_REGISTRY["tiny_cnn"].build)
    try:
        cache = RunCache(max_datasets=2)
        a, b = tiny_config, tiny_config.replace(backbone="tiny_cnn_b")
        c = a.replace(image_size=24)
        first = cache.dataset(a)
        cache.dataset(b)  # another crop: its own decode
        cache.dataset(c)  # another size: its own decode; the oldest (a) goes
        assert cache.decoded == 3 * 36
        assert cache.dataset(b) is cache.dataset(b) and cache.dataset(a) is not first  # kept reused, evicted reloaded
        assert cache.decoded == 3 * 36  # reloaded from the store on disk, not decoded again
        cfg = a.replace(freeze_depth=2, aug_strength=0.0, epochs=1)
        for backbone in ("tiny_cnn", "tiny_cnn_b", "tiny_cnn", "tiny_cnn_b"):
            finetune(cfg.replace(backbone=backbone), cache.dataset(cfg.replace(backbone=backbone)), cache=cache)
        assert cache.held_bytes() <= cache.max_bytes
        features = [k for k in cache.held_keys() if k[0] == "features"]
        assert {k[1] for k in features} == {"tiny_cnn", "tiny_cnn_b"} and len(features) == 4  # per backbone and view
        assert sum(k[-1] == "flip" for k in features) == 2  # the mirrored images', for test-time augmentation
    finally:
        _REGISTRY.pop("tiny_cnn_b")


def test_device_streaming_with_a_tiny_device_budget_on_cpu_tensors(tiny_config, monkeypatch):
    """Over the device budget, batches are read from the store by a background thread (into pinned memory on
    CUDA); the CPU runs that path too when its budget is tiny. The batches and the training are the same."""
    import threading

    cfg = tiny_config.replace(epochs=2, aug_strength=0.5, cv_folds=1)
    data, cpu = load_data(cfg), torch.device("cpu")
    assert type(RunCache().images(data.labelled, cpu)) is Images  # within budget: the memory map, read directly
    streamed = RunCache(device_bytes=1)
    images = streamed.images(data.labelled, cpu)
    assert isinstance(images, Streamed)
    readers = []
    host = Streamed._host
    monkeypatch.setattr(
        Streamed, "_host", lambda self, i: readers.append(threading.current_thread().name) or host(self, i)
    )
    batches = torch.randperm(len(data.labelled)).split(5)
    got = list(images.batches(batches))
    assert len(got) == len(batches) and all(torch.equal(g, data.labelled.read(b)) for g, b in zip(got, batches))
    assert readers and all(r.startswith("autoft-stream") for r in readers)  # read beside the compute, not in it
    a, b = finetune(cfg, data, cache=streamed), finetune(cfg, data)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]


_ANON_RUN = """
import sys, threading, time
from autoft.config import Config
from autoft.training.loop import finetune

def anonymous():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak = [anonymous()]
def sample():
    while True:
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
finetune(Config(data=sys.argv[1], backbone="tiny_cnn", image_size=96, batch_size=16, epochs=1, cv_folds=1,
                device="cpu", aug_strength=0.5))
print(max(peak[0], anonymous()))
"""


def _peak_anonymous_bytes(root) -> int:
    import os
    import subprocess
    import sys

    # A fixed mmap threshold: glibc's sliding one lets freed batch buffers fragment the heap, by an amount that
    # grows with the steps a run takes and says nothing about what the run holds per image (README).
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="131072",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    out = subprocess.run(
        [sys.executable, "-c", _ANON_RUN, str(root)], capture_output=True, text=True, env=env, check=True
    )
    return int(out.stdout.split()[-1])


ALLOWANCE = 600 * 2**20  # tiny_cnn at 96 px, batch 16: the framework and one step's buffers, whatever the images


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_anonymous_memory_of_a_run_does_not_grow_with_the_images(tmp_path):
    """Decoded pixels live in the memory-mapped store (file-backed pages), never in the process's own memory:
    ten times the images adds their labels and paths, far under one more decoded copy (110 px stored: 36 KB each).
    Batches of 16: the small set's last batches are full too, so the peaks compare like for like."""
    from conftest import make_image_folder

    small = make_image_folder(tmp_path / "small", per_class=100, splits=("train",), size=16)
    large = make_image_folder(tmp_path / "large", per_class=1000, splits=("train",), size=16)
    peaks = _peak_anonymous_bytes(small), _peak_anonymous_bytes(large)
    assert max(peaks) < ALLOWANCE, [p / 2**20 for p in peaks]
    grown = peaks[1] - peaks[0]
    one_copy = 1800 * 3 * 110 * 110  # 65 MiB: what holding the added images' pixels would cost
    # Measured: 4-7 MiB more (paths, labels, the store's index, allocator slack), from run to run.
    assert grown < one_copy / 4, f"{grown / 2**20:.1f} MiB more for 1,800 more images"


def test_device_copies_stay_under_the_device_budget_and_go_with_their_dataset(tiny_config):
    """The accelerator's bookkeeping, on PyTorch's meta device (shapes without memory): a set is copied once while
    it fits the budget, older copies make room, a set over the budget streams, and a dropped dataset frees its copy."""
    meta = torch.device("meta")
    cache = RunCache(max_datasets=1)
    data = cache.dataset(tiny_config)
    cache.device_bytes = data.labelled.nbytes
    first = cache.images(data.labelled, meta)
    assert type(first).__name__ == "Resident" and first.images.shape == (len(data.labelled), 3, 36, 36)
    assert cache.images(data.labelled, meta).images is first.images  # copied once, then reused
    cache.images(data.val, meta)  # the budget holds one of the two: the older copy goes
    assert cache.device_held() == data.val.nbytes
    cache.device_bytes = data.val.nbytes - 1
    assert isinstance(cache.images(data.train, meta), Streamed)  # over the budget: streamed, nothing copied
    cache.dataset(tiny_config.replace(image_size=24))  # one dataset at a time: the first goes, and its copy with it
    assert cache.device_held() == 0


def test_fixed_steps_epochs_read_only_the_rows_their_batches_name(tiny_config, monkeypatch):
    """epoch_images=k: each epoch trains on a fresh draw of k training images (the schedule's steps follow it), and
    the store is read for exactly those rows and the validation images, never the rest of the training set."""
    from autoft.data.store import ImageStore

    cfg = tiny_config.replace(epoch_images=10, batch_size=4, epochs=2, cv_folds=1, aug_strength=0.5)
    data = load_data(cfg)
    reads = []
    read = ImageStore.read
    monkeypatch.setattr(ImageStore, "read", lambda self, rows: reads.append(list(rows)) or read(self, rows))
    trained = []
    step = ft.train_one_epoch
    monkeypatch.setattr(ft, "train_one_epoch", lambda *a, **k: trained.append(torch.cat(list(a[5]))) or step(*a, **k))
    result = finetune(cfg, data)
    assert [len(t) for t in trained] == [10, 10] and not torch.equal(trained[0], trained[1])  # a fresh draw each epoch
    assert all(len(set(t.tolist())) == 10 and set(t.tolist()) <= set(data.holdout.train.tolist()) for t in trained)
    train_rows = {int(r) for t in trained for r in data.labelled.rows[t]}
    val_rows = set(data.val.rows.tolist())
    read_rows = [r for batch in reads for r in batch]
    # the validation images each epoch, and once more mirrored (test-time augmentation's check)
    assert set(read_rows) == train_rows | val_rows and len(read_rows) == 20 + 3 * len(val_rows)
    assert len(data.train) > 10 and result.history[0]["images_per_s"] > 0
    assert result.history[-1]["lr_head"] == pytest.approx(0.0, abs=1e-9)  # the cosine ends on the last step
