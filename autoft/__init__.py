"""autoft: find the best way to fine-tune a pretrained image classifier on your own images."""

from .backbones import get_backbone, list_backbones, register_backbone
from .config import Config
from .exceptions import AutoftError
from .finetune import Result

__version__ = "0.1.0"

__all__ = [
    "AutoftError",
    "Config",
    "Result",
    "get_backbone",
    "list_backbones",
    "register_backbone",
]
