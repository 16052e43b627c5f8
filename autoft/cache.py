"""What a run keeps in memory, in one owner: `RunCache`.

A search, a worker, a train run or an evaluation creates one and passes it down; nothing else in autoft
keeps run state between calls. It holds the datasets a run asked for (index sets into the on-disk image
store, a few bytes per image), their copies on the compute device while they fit a device budget, the
frozen-prefix features and the pretrained stages under one byte budget, least recently used out first,
and `clear()` to let go of all of it (between studies, after an out-of-memory error).

Images reach the model through `Images`: batches cut by index from the store's memory map (CPU), from a
copy on the device made once (an accelerator, while it fits), or streamed through pinned host memory by
a background thread that reads the next batch while the device computes on this one.
"""

from __future__ import annotations

import gc
import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .backbones import get_backbone, pretrained_stages
from .config import Config
from .data.dataset import Dataset, Split, load_dataset
from .data.scan import Labels

MAX_BYTES = 3 * 2**30  # frozen-prefix features and pretrained stages together, wherever they live
DEVICE_FRACTION = 0.5  # of an accelerator's memory (free plus what this run already holds there) for image copies
MAX_DATASETS = 4  # datasets kept at once (several image sizes or crops in one search)


def load_data(cfg: Config, value_range: tuple[float, float] | None = None) -> Dataset:
    """The dataset a config names, decoded at the size its backbone's crop needs (32-bit integer and float
    images scaled by `value_range`, a model's; None: by the one range these images give).

    A held-out validation split does not follow `cfg.seed`: every trial, seed and retrain of a
    search must validate on the same images, or their scores would not compare.
    """
    return load_dataset(
        cfg.data,
        cfg.image_size,
        get_backbone(cfg.backbone).crop_pct,
        val_fraction=cfg.val_fraction,
        skip_bad_images=cfg.skip_bad_images,
        labels=label_files(cfg),
        value_range=value_range,
    )


def label_files(cfg: Config) -> Labels | None:
    """The labels CSVs `cfg` names and their columns; None for class folders."""
    if cfg.labels is None:
        return None
    return Labels(cfg.labels, cfg.val_labels, cfg.test_labels, cfg.path_column, cfg.label_column)


class Images:
    """uint8 (N, 3, S, S) images on `device`, cut into batches by index (positions in the split).

    This base reads each batch from the store's memory map when asked: the CPU path (the page cache holds
    the pixels, not the process) and one-off passes such as scoring test/. `key` names the images for the
    frozen-feature cache (None: not cached).
    """

    def __init__(self, split: Split, device: torch.device):
        self.split, self.device, self.key = split, device, split.key

    def __len__(self) -> int:
        return len(self.split)

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.split.store.read(self.split.rows[index.cpu()].numpy())).to(self.device)

    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The images at each index tensor in turn."""
        for index in indices:
            yield self.get(index)


class Resident(Images):
    """Images already in one tensor on the device (a device copy of a split, or images a caller decoded)."""

    def __init__(self, images: torch.Tensor, key: Hashable | None = None):
        self.images, self.device, self.key = images, images.device, key

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index.to(self.images.device)]


class Streamed(Images):
    """Batches read from the store by a background thread into pinned host memory (on CUDA) and copied with
    `non_blocking=True`, so reading batch i+1 overlaps the device's work on batch i (the double buffering of
    torch DataLoader's pin_memory thread, without worker processes). Works on any device; only CUDA pins."""

    def __init__(self, split: Split, device: torch.device):
        super().__init__(split, device)
        self.pin = device.type == "cuda"

    def _host(self, index: torch.Tensor) -> torch.Tensor:
        rows = self.split.rows[index.cpu()].numpy()
        out = torch.empty((len(rows), *self.split.store.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        self.split.store.read(rows, out.numpy())
        return out

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self._host(index).to(self.device, non_blocking=self.pin)

    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        with ThreadPoolExecutor(1, thread_name_prefix="autoft-stream") as reader:
            pending = None
            for index in indices:
                following = reader.submit(self._host, index)
                if pending is not None:
                    yield pending.result().to(self.device, non_blocking=self.pin)
                pending = following
            if pending is not None:
                yield pending.result().to(self.device, non_blocking=self.pin)


def as_images(images: torch.Tensor | Split | Images, device: torch.device) -> Images:
    """Any image source as `Images`: a tensor stays where it is (batches move to `device`), a split is read from
    its store."""
    if isinstance(images, Images):
        return images
    if isinstance(images, Split):
        return Images(images, device)
    return Resident(images)


class RunCache:
    """Everything a run keeps in memory between trials and folds, under its budgets.

    `max_bytes` bounds frozen-prefix features and pretrained stages together (least recently used out; a
    feature set larger than the whole budget is never made: callers then run the prefix per batch; the
    newest pretrained stages always stay). `device_bytes` bounds the copies of image sets on an accelerator
    (None: DEVICE_FRACTION of its memory); a set over it is streamed instead. On the CPU the store's memory map
    is read directly, unless `device_bytes` is set and the set exceeds it (the streamed path, for tests).
    `decoded` counts the images decoded to build the datasets this cache loaded.
    """

    def __init__(self, max_bytes: int = MAX_BYTES, device_bytes: int | None = None, max_datasets: int = MAX_DATASETS):
        self.max_bytes, self.device_bytes, self.max_datasets = max_bytes, device_bytes, max_datasets
        self.decoded = 0
        self._datasets: OrderedDict[tuple, Dataset] = OrderedDict()
        self._device: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._held: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()  # features and pretrained stages, with bytes
        self._lock = threading.Lock()
        self.stage_builds = self.stage_hits = 0
        self.feature_passes: Counter[tuple] = Counter()  # frozen-feature passes over a set of images, by key

    # --- datasets and their images -------------------------------------------------------------------------

    def dataset(self, cfg: Config) -> Dataset:
        """The dataset `cfg` names, loaded once for this cache: by data folder, decoded size and split settings."""
        key = (
            cfg.data,
            label_files(cfg),
            cfg.image_size,
            get_backbone(cfg.backbone).crop_pct,
            cfg.val_fraction,
            cfg.skip_bad_images,
        )
        if key in self._datasets:
            self._datasets.move_to_end(key)
            return self._datasets[key]
        data = self._datasets[key] = load_data(cfg)
        self.decoded += data.store.decoded
        while len(self._datasets) > self.max_datasets:
            _, old = self._datasets.popitem(last=False)
            self._drop_device_copies(str(old.store.file))
        return data

    def images(self, split: Split, device: torch.device) -> Images:
        """`split`'s images for training and validation on `device`: copied there once while they fit the device
        budget, else streamed; on the CPU read from the memory map."""
        if device.type == "cpu":
            if self.device_bytes is None or split.nbytes <= self.device_bytes:
                return Images(split, device)
            return Streamed(split, device)
        key = (split.key, str(device))
        if key in self._device:
            self._device.move_to_end(key)
            return Resident(self._device[key], split.key)
        budget = self.device_budget(device)
        if split.nbytes > budget:
            return Streamed(split, device)
        while self._device and self.device_held() + split.nbytes > budget:
            self._device.popitem(last=False)
        copy = torch.empty((len(split), *split.store.images.shape[1:]), dtype=torch.uint8, device=device)
        for chunk in torch.arange(len(split)).split(1024):  # through host memory a chunk at a time
            copy[chunk[0] : chunk[-1] + 1] = split.read(chunk).to(device)
        self._device[key] = copy
        return Resident(copy, split.key)

    def device_budget(self, device: torch.device) -> int:
        if self.device_bytes is not None:
            return self.device_bytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(DEVICE_FRACTION * (free + self.device_held()))
        if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
            return int(DEVICE_FRACTION * torch.mps.recommended_max_memory())
        return 0

    def device_held(self) -> int:
        return sum(t.numel() for t in self._device.values())

    def _drop_device_copies(self, store_file: str) -> None:
        for key in [k for k in self._device if k[0][0] == store_file]:
            del self._device[key]

    # --- features and pretrained stages, under max_bytes ---------------------------------------------------

    def get(self, key: tuple) -> Any | None:
        """A held value (features, pretrained stages), marked as just used; None when not held."""
        with self._lock:
            hit = self._held.get(key)
            if hit is None:
                return None
            self._held.move_to_end(key)
            return hit[0]

    def make_room(self, nbytes: int) -> bool:
        """Evict the least recently used values until `nbytes` more fit; False (nothing evicted) when they never can."""
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            while self._held and self.held_bytes() + nbytes > self.max_bytes:
                self._held.popitem(last=False)
        return True

    def put(self, key: tuple, value: Any, nbytes: int) -> None:
        with self._lock:
            self._held[key] = (value, nbytes)
            self._held.move_to_end(key)

    def held_bytes(self) -> int:
        """Bytes of every feature set and pretrained stage held."""
        return sum(n for _, n in self._held.values())

    def held_keys(self) -> list[tuple]:
        """Oldest first."""
        return list(self._held)

    def pretrained_stages(self, name: str, weights: str | None) -> tuple[list[nn.Module], int]:
        """A backbone's pretrained stages, read from disk once while they stay in the budget (models deep-copy them).

        A byte bound rather than a count: alternating the small offline backbones (about 100 MB in all) never
        re-reads a file, while a few huge models cannot pile up. The newest entry always stays, however large.
        """
        key = ("stages", name, weights)
        value = self.get(key)
        if value is not None:
            self.stage_hits += 1
            return value
        self.stage_builds += 1
        value = pretrained_stages(name, weights)  # outside the lock: reading weights may take seconds
        held = nn.ModuleList(value[0])  # parameters() and buffers() count a module shared by stages once
        nbytes = sum(t.numel() * t.element_size() for t in (*held.parameters(), *held.buffers()))
        self.make_room(min(nbytes, self.max_bytes))
        self.put(key, value, nbytes)
        return value

    def clear(self) -> None:
        """Let go of device copies, features and pretrained stages, and collect garbage (after an out-of-memory
        error, between studies). Datasets stay: index sets and a file mapping, a few bytes per image."""
        with self._lock:
            self._held.clear()
        self._device.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
