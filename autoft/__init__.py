"""autoft: find the best way to fine-tune a pretrained image classifier on your own images.

Python API: `search(...)` runs a study, `train(config)` fine-tunes once, `load_model(path)` gives a
Predictor with `.predict(images)`.
"""

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from .backbones import get_backbone, list_backbones, register_backbone
from .config import Config
from .exceptions import AutoftError, ConfigError
from .results.predict import Predictor, load_model
from .training.loop import Result

if TYPE_CHECKING:
    import optuna

    from .study.run import SearchOptions

__version__ = "0.1.0"


def search(config: Config | None = None, options: "SearchOptions | None" = None, **settings: Any) -> "optuna.Study":
    """Run (or resume) a search from Python: `autoft.search(data="photos", trials=20, epochs=3)`.

    Each keyword is a Config key (the base every trial starts from: data, backbone, epochs, image_size, ...)
    or a SearchOptions field (trials, study, storage, sampler, pruner, space, ...); keywords override
    `config` and `options`, and a searched key given as a keyword (`image_size=160`) is not searched.
    Exports land in studies/<study>/ as with `autoft search`. Returns the optuna.Study.
    """
    from .storage import quiet_optuna
    from .study.run import SearchOptions, run_search, search_settings

    given = [f.name for f in dataclasses.fields(Config)] if config is not None else []  # a Config is taken as is
    base, opts, fixed = search_settings(
        config or Config(), options or SearchOptions(), settings, given, where="autoft.search: "
    )
    with quiet_optuna():  # the summary and progress bar are the output; Optuna's INFO lines are not
        return run_search(base, opts, fixed=fixed)


def train(
    config: Config | str | os.PathLike, out: str | os.PathLike = "runs/train", full: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Fine-tune once, like `autoft train`: `config` is a Config or a YAML file (an exported best.yaml works).

    Writes model.pt, config.yaml and metrics.json to `out` and returns the metrics (test_accuracy when the
    data has test/).
    """
    from .training.run import train as run_train

    if isinstance(config, Config):
        config = config.replace(**overrides)
    else:
        config = Config.from_yaml(config, **overrides)
    return run_train(config, out, full=full)


__all__ = [
    "AutoftError",
    "Config",
    "ConfigError",
    "Predictor",
    "Result",
    "get_backbone",
    "list_backbones",
    "load_model",
    "register_backbone",
    "search",
    "train",
]
