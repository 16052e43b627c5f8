"""What makes a search cheap: work done once per process, bounded caches, nothing kept between trials.

Behaviour only; speed figures live in benchmarks/.
"""

import gc

import pytest
import torch

import autoft.finetune as ft
from autoft.backbones import Net, _pretrained_stages, _REGISTRY, build_model, register_backbone
from autoft.finetune import finetune, load_data
from autoft.study import SearchOptions, run_search


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
    _pretrained_stages.cache_clear()


def test_frozen_features_are_computed_once_across_epochs_and_trials(tiny_config, prefix_images):
    cfg = tiny_config.replace(freeze_depth=2, aug_strength=0.0, epochs=3)
    data = load_data(cfg)
    finetune(cfg, data)
    finetune(cfg.replace(seed=1, head_lr=0.01), data)  # another trial, same frozen prefix
    assert sum(prefix_images) == len(data.train) + len(data.val)  # not 2 trials x 3 epochs x that


def test_augmented_trials_still_reuse_validation_features(tiny_config, prefix_images):
    cfg = tiny_config.replace(freeze_depth=1, aug_strength=0.5, epochs=3)
    data = load_data(cfg)
    finetune(cfg, data)
    finetune(cfg, data)
    # Augmented training batches need the prefix every step (each fold its own training images); every
    # labelled image goes through it once, for the validation of whichever fold holds it out.
    folds = ft.plan_folds(cfg, data)
    assert sum(prefix_images) == 2 * 3 * sum(len(f.train) for f in folds) + len(data.labelled)


def test_feature_cache_stays_under_its_bound_and_evicts_oldest(tiny_config, monkeypatch):
    cfg = tiny_config
    data = load_data(cfg)
    model, spec = build_model(cfg.backbone, 2)
    dev = torch.device("cpu")
    one = ft.frozen_features(model, spec, cfg, data.val.images, 1, dev)  # (N, 8, 16, 16) floats
    ft.clear_caches()
    bound = int(one.numel() * one.element_size() * 1.2)
    monkeypatch.setattr(ft, "FEATURE_CACHE_BYTES", bound)
    ft.frozen_features(model, spec, cfg, data.val.images, 1, dev)
    ft.frozen_features(model, spec, cfg, data.val.images, 2, dev)  # half the size: depth 1 must go to make room
    assert ft._cached_bytes() <= bound
    assert [k[3] for k in ft._features] == [2]
    assert ft.frozen_features(model, spec, cfg, data.val.images, 2, dev) is ft._features[next(iter(ft._features))][1]


def test_features_larger_than_the_bound_are_never_materialised(tiny_config, monkeypatch):
    cfg = tiny_config.replace(freeze_depth=1, aug_strength=0.0, epochs=2)
    data = load_data(cfg)
    model, spec = build_model(cfg.backbone, 2)
    allocated = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or empty(*a, **k))
    monkeypatch.setattr(ft, "FEATURE_CACHE_BYTES", 1000)  # smaller than one split's features
    assert ft.frozen_features(model, spec, cfg, data.train.images, 1, torch.device("cpu")) is None
    assert not allocated and not ft._features
    result = finetune(cfg, data)  # falls back to running the prefix per batch
    assert len(result.history) == 2 and not ft._features


def test_weights_are_read_once_per_process_and_each_trial_gets_its_own_copy(tiny_config, counting_backbone):
    cfg = tiny_config.replace(backbone="counting_cnn", epochs=1, freeze_depth=0)
    data = load_data(cfg)
    first = finetune(cfg, data)
    second = finetune(cfg, data)
    assert counting_backbone == [None]  # built (weights read) once for both trials
    pristine, _ = _pretrained_stages("counting_cnn", None)
    trained = first.state_dict
    # Training changed the trial's copy, never the process-wide pretrained stages the next trial copies.
    key = "stages.0.0.weight"
    assert not torch.equal(trained[key], pristine[0][0].weight)
    assert first.history[0]["val_loss"] == second.history[0]["val_loss"]  # same seed, same pristine start


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive, less the bounded feature cache (tested above)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no deprecation proxies poked
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values()) - ft._cached_bytes()


def test_memory_does_not_grow_from_trial_to_trial(tmp_path, tiny_config, monkeypatch):
    """The CPU proxy for 'GPU memory is released between trials': live tensor bytes at each trial's start."""
    import autoft.objective as objective_module

    monkeypatch.chdir(tmp_path)

    at_start = []

    def measured(cfg, data=None, report=None):
        at_start.append(_live_tensor_bytes())
        return ft.finetune(cfg, data, report)

    monkeypatch.setattr(objective_module, "finetune", measured)
    run_search(tiny_config.replace(epochs=1), SearchOptions(trials=10, progress=False, sampler="random", pruner="none"))
    assert len(at_start) == 10
    # Trials hold a model, optimizer state and best weights: any of them kept past its trial would add up.
    assert max(at_start[2:]) <= at_start[1] + 64 * 1024, at_start


def test_caches_stay_bounded_when_backbones_alternate(tiny_config, monkeypatch):
    """Datasets per backbone crop and size, features per backbone/size/depth: both bounded, oldest out first."""
    from autoft.backbones import _REGISTRY

    register_backbone("tiny_cnn_b", stages=3, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.75, native_size=32,
                      offline=True, pretrained=False)(_REGISTRY["tiny_cnn"].build)
    try:
        datasets = ft.Datasets()
        a, b = tiny_config, tiny_config.replace(backbone="tiny_cnn_b")
        one = ft._dataset_bytes(datasets(a))
        datasets.max_bytes = int(one * 2.5)  # room for two of the three decodes below
        c = a.replace(image_size=24)
        first = datasets(a)
        datasets(b)  # another crop: its own decode
        datasets(c)  # another size: its own decode; the oldest (a) goes
        assert sum(map(ft._dataset_bytes, datasets._cache.values())) <= datasets.max_bytes
        assert datasets(b) is datasets(b) and datasets(a) is not first  # kept ones reused, evicted ones reloaded
        cfg = a.replace(freeze_depth=2, aug_strength=0.0, epochs=1)
        for backbone in ("tiny_cnn", "tiny_cnn_b", "tiny_cnn", "tiny_cnn_b"):
            finetune(cfg.replace(backbone=backbone), datasets(cfg.replace(backbone=backbone)))
        assert ft._cached_bytes() <= ft.FEATURE_CACHE_BYTES
        assert {k[0] for k in ft._features} == {"tiny_cnn", "tiny_cnn_b"}  # one entry per backbone, reused
        assert len(ft._features) == 2
    finally:
        _REGISTRY.pop("tiny_cnn_b")
        _pretrained_stages.cache_clear()
