"""The "vision" task: image classification on Vim, the VTAB-1k protocol (METHODS.md §3), for the engine.

A config's `task` section:
    type: vision
    data: PATH            # a VTAB-1k task folder, or a class-per-folder tree (see vision/data.py)
    root: null            # a folder that a relative `data` is taken in (the VTAB-1k root: data: cifar)
    train: train800val200 # the split trained on (default: train800val200, or train for folders)
    validation: null      # default: val200 when training on train800, val for folders that have it
    test: test            # default: test when the data has it
    image_size: 224       # images are resized to this; the Vim is built or resized to it
    num_classes: null     # default: read from the data
    eval_batch_size: 64
    num_workers: null     # DataLoader processes decoding images for evaluation (default: cores - 1, at
                          # most 8); the engine's training.num_workers decodes the training images
    check_images: true    # open every image's header before training
    suite: null           # default: the shipped vision suite (written once into a cache folder, see
                          # default/shipped.py) is the root; a model section without path or preset
                          # is then the shipped vim-default

The model section: `preset: vim-tiny|vim-small|vim-base` with VimConfig fields to override (a random
Vim), or `path:` a checkpoint VisionMamba.from_pretrained reads (a hustvl `.pth`, a directory, a hub
id), whose head is re-initialised with as many classes as the data; `drop_path_rate` for either.
"""
import os
import warnings
from dataclasses import fields

import torch
import torch.nn.functional as F

from ..models.config import VimConfig
from ..models.vim import VisionMamba
from ..peft.config import ConfigError
from ..training.task import register_task
from .data import ImageDataset, check_images, collate, default_workers, open_image_data

TASK_KEYS = ("type", "data", "root", "train", "validation", "test", "image_size", "num_classes", "eval_batch_size",
             "num_workers", "check_images", "suite")


@register_task("vision")
def build(section, source="task"):
    return VisionTask(section, source)


def _positive_int(section, key, source, default):
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}.{key}: expected a positive integer, got {value!r}")
    return value


class VisionTask:
    metric = "acc"
    greater_is_better = True
    unit = "samples"

    def __init__(self, section: dict, source: str = "task"):
        unknown = sorted(set(section) - set(TASK_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(TASK_KEYS)}")
        if not isinstance(section.get("data"), str):
            raise ConfigError(f"{source}.data: expected the path of a VTAB-1k task folder or a class-per-folder tree")
        self.source = source
        self.image_size = _positive_int(section, "image_size", source, 224)
        self.eval_batch_size = _positive_int(section, "eval_batch_size", source, 64)
        workers = section.get("num_workers")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ConfigError(f"{source}.num_workers: expected an integer >= 0, got {workers!r}")
        self.num_workers = default_workers() if workers is None else workers
        self.suite = section.get("suite")
        if self.suite not in (None, "default"):
            raise ConfigError(f"{source}.suite: expected default (the shipped vision suite) or null, got {self.suite!r}")
        root = section.get("root")
        if self.suite == "default":
            from ..default.shipped import vision_suite_dir
            root = str(vision_suite_dir())
        data = section["data"] if root is None else os.path.join(root, section["data"])
        self.data = open_image_data(data, _positive_int(section, "num_classes", source, None))
        vtab = self.data.layout == "vtab"
        self.train_split = section.get("train") or ("train800val200" if vtab else "train")
        default_val = ("val200" if self.train_split == "train800" else None) if vtab else \
            ("val" if "val" in self.data.splits else None)
        self.splits = {"validation": section.get("validation", default_val),
                       "test": section.get("test", "test" if "test" in self.data.splits else None)}
        for name in [self.train_split, *filter(None, self.splits.values())]:
            samples = self.data.split(name, f"{source}")
            if section.get("check_images", True):
                check_images(samples)

    @property
    def num_classes(self):
        return self.data.num_classes

    # ---- the engine's contract ------------------------------------------------------------
    def load_model(self, model_section: dict) -> torch.nn.Module:
        section = dict(model_section or {})
        where = "model"
        drop_path = section.pop("drop_path_rate", None)
        if "img_size" in section or "num_classes" in section:
            raise ConfigError(f"{where}: img_size and num_classes come from the task (task.image_size, the data)")
        if self.suite == "default" and "path" not in section and "preset" not in section:
            section["path"] = "vim-default"
        if "path" in section:
            from ..default.shipped import resolve_model
            path = resolve_model(section.pop("path"))
            if section:
                raise ConfigError(f"{where}: with 'path' only drop_path_rate may be set, got {', '.join(section)}")
            with warnings.catch_warnings():  # a new head is what fine-tuning on another label set needs
                warnings.filterwarnings("ignore", message=".*newly initialised")
                model = VisionMamba.from_pretrained(path, num_classes=self.num_classes, img_size=self.image_size)
            if drop_path is not None:
                set_drop_path(model, drop_path)
            return model
        name = section.pop("preset", "vim-small")
        known = {f.name for f in fields(VimConfig)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected path or preset and "
                              f"VimConfig fields ({', '.join(sorted(known - {'img_size', 'num_classes', 'extra'}))})")
        if drop_path is not None:
            section["drop_path_rate"] = drop_path
        try:
            config = VimConfig.preset(name, **section, num_classes=self.num_classes, img_size=self.image_size)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
        return VisionMamba(config)

    def train_set(self):
        return ImageDataset(self.data.split(self.train_split), self.image_size)

    def collate(self, items):
        return collate(items)

    def loss(self, model, batch):
        device = _device(model)
        labels = batch["labels"].to(device, non_blocking=True)
        logits = model(batch["images"].to(device, non_blocking=True))
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()

    @torch.no_grad()
    def evaluate(self, model, split):
        name = self.splits.get(split)
        if name is None:
            raise KeyError(split)   # the contract: the engine skips a split the task does not have
        loader = torch.utils.data.DataLoader(ImageDataset(self.data.split(name), self.image_size),
                                             batch_size=self.eval_batch_size, num_workers=self.num_workers,
                                             collate_fn=collate)
        device, was_training = _device(model), model.training
        model.eval()
        correct, loss, count = 0, 0.0, 0
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                for batch in loader:
                    labels = batch["labels"].to(device)
                    logits = model(batch["images"].to(device)).float()
                    correct += int((logits.argmax(-1) == labels).sum())
                    loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                    count += labels.numel()
        finally:
            model.train(was_training)
        return {"acc": correct / count, "loss": loss / count, "samples": count}


def _device(model):
    return next(model.parameters()).device


def set_drop_path(model, rate):
    """Stochastic depth rates linspace(0, rate, depth) over the layers, as VisionMamba builds them."""
    model.config.drop_path_rate = rate
    rates = torch.linspace(0, rate, len(model.layers)).tolist()
    for layer, p in zip(model.layers, rates):
        layer.drop_path.p = p
