"""`mambapeft pretrain vim`: a Vision Mamba classifier from scratch on CORPUS/images.safetensors, the
uint8 images of each source beside their labels (NAME, NAME_labels; default/corpora.py).

One head over every source's classes: fashion_mnist's 10 take 0-9, digits' 10 take 10-19 (a digit
and a sandal are different things, so the classes are kept apart). The small digits set (about 1,300
images against 69,500) is not oversampled: over ~15 epochs each digit is seen ~15 times already, and
repeating it more would only fit those few images. A seeded slice of each source is held out.

Preprocessing is the vision protocol's (vision/data.py): grayscale to RGB, bicubic resize to
image_size, ImageNet normalisation; the resize is done once for the whole corpus (the protocol has no
augmentation), the uint8 result kept, and the normalisation done on the device in each batch."""
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..cli import UsageError
from ..models import VimConfig, VisionMamba
from ..vision.data import normalise, rgb_pixels
from . import run

LABELS = "_labels"   # as default/corpora.py writes them
ORDER = ("fashion_mnist", "digits")   # the order of the sources' class ranges in the head; others follow, sorted
# 32x32 (the size of the suite's procedural images; Fashion-MNIST's 28 and the digits' 8 upscaled),
# 4x4 patches: an 8x8 grid, 65 tokens with the CLS. Width 128, depth 12: 1.6M parameters, 6.5 MB fp32.
SHAPE = {"img_size": 32, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 12, "drop_path_rate": 0.1}
DEFAULTS = {"steps": 4000, "batch_size": 256, "lr": 1e-3, "warmup": 200, "eval_every": 250, "weight_decay": 0.05,
            "validation": 0.03}


def read_images(corpus_dir):
    """{source: (images (N, H, W) uint8 numpy, labels (N,) int64 numpy)} and the file's path."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise UsageError(f"{corpus_dir}: no such corpus folder (expected the corpus/ that build-corpora writes)")
    path = corpus_dir / "images.safetensors"
    if not path.is_file():
        raise UsageError(f"{path}: not found (mambapeft build-corpora writes it)")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable safetensors file ({e})") from None
    out = {}
    names = [k for k in arrays if not k.endswith(LABELS)]   # the file's order is alphabetical: fix ours
    for name in sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        images, labels = arrays[name], arrays.get(name + LABELS)
        if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0:
            raise UsageError(f"{path}: {name}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        if labels is None:
            raise UsageError(f"{path}: {name}: no labels ({name}{LABELS}); rebuild the corpus with "
                             "mambapeft build-corpora")
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0:
            raise UsageError(f"{path}: {name}{LABELS}: expected {len(images)} integer labels >= 0, got "
                             f"{labels.dtype} {labels.shape}")
        out[name] = (images, labels.astype(np.int64))
    if not out:
        raise UsageError(f"{path}: holds no images")
    return path, out


def prepare(images, size):
    """(N, 3, size, size) uint8: each image through the protocol's RGB conversion and resize."""
    return torch.stack([rgb_pixels(Image.fromarray(a, "L"), size) for a in images]) if len(images) else \
        torch.zeros(0, 3, size, size, dtype=torch.uint8)


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.pixels[i], self.labels[i]


class ImageTask:
    """The engine's contract for the corpus: cross entropy summed over the images; validation
    accuracy (overall and per source) on the held-out images."""
    metric, greater_is_better, unit = "acc", True, "samples"

    def __init__(self, train, validation, classes, config: VimConfig, eval_batch_size=512):
        self.sets = {"train": train, "validation": validation}
        self.classes, self.config, self.eval_batch_size = classes, config, eval_batch_size

    def load_model(self, model_section):
        return VisionMamba(self.config)

    def train_set(self):
        return self.sets["train"]

    def collate(self, items):
        pixels, labels = zip(*items)
        return {"pixels": torch.stack(pixels), "labels": torch.stack(labels)}

    def loss(self, model, batch):
        logits = model(normalise(batch["pixels"]))
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()

    def evaluate(self, model, split):
        data = self.sets.get(split)
        if data is None or split == "train":
            raise KeyError(split)
        device = next(model.parameters()).device
        loss, predictions = 0.0, []
        for i in range(0, len(data), self.eval_batch_size):
            pixels = data.pixels[i:i + self.eval_batch_size].to(device)
            labels = data.labels[i:i + self.eval_batch_size].to(device)
            logits = model(normalise(pixels)).float()
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            predictions.append(logits.argmax(-1).cpu())
        right = torch.cat(predictions) == data.labels
        out = {"loss": loss / len(data), "acc": float(right.float().mean())}
        for name, (lo, hi) in self.classes.items():   # per source, by its range of classes
            mine = (data.labels >= lo) & (data.labels < hi)
            if mine.any():
                out[f"acc_{name}"] = float(right[mine].float().mean())
        return out


def split_sources(sources, size, validation, seed):
    """Train and validation ImageSets over all sources (labels offset per source) and each source's
    class range."""
    g = np.random.default_rng(seed)
    parts, classes, offset = {"train": [], "validation": []}, {}, 0
    for name, (images, labels) in sources.items():
        n_classes = int(labels.max()) + 1
        classes[name] = (offset, offset + n_classes)
        order = g.permutation(len(images))
        n_val = max(1, round(validation * len(images)))
        if len(images) < 2 * n_val:
            raise UsageError(f"images.safetensors: {name}: {len(images)} images are too few to hold out {n_val}")
        for split, idx in (("validation", order[:n_val]), ("train", order[n_val:])):
            idx = np.sort(idx)
            parts[split].append((prepare(images[idx], size), torch.from_numpy(labels[idx] + offset)))
        offset += n_classes
    sets = {k: ImageSet(torch.cat([p for p, _ in v]), torch.cat([lab for _, lab in v])) for k, v in parts.items()}
    return sets["train"], sets["validation"], classes


def pretrain(corpus_dir, out_dir, steps=DEFAULTS["steps"], batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"],
             seed=0, warmup=DEFAULTS["warmup"], eval_every=DEFAULTS["eval_every"],
             weight_decay=DEFAULTS["weight_decay"], validation=DEFAULTS["validation"], device="auto", **shape):
    """Train the Vim; write OUT_DIR (config.json + model.safetensors, run/, pretrain.json)."""
    out = run.check_out_dir(out_dir)
    shape = {**SHAPE, **{k: v for k, v in shape.items() if v is not None}}
    start = time.perf_counter()
    path, sources = read_images(corpus_dir)
    train, val, classes = split_sources(sources, shape["img_size"], validation, seed)
    if len(train) < batch_size:
        raise UsageError(f"{path}: {len(train)} training images are fewer than --batch-size {batch_size}")
    try:
        config = VimConfig(**shape, num_classes=max(hi for _, hi in classes.values()))
    except ValueError as e:
        raise UsageError(str(e)) from None
    prepare_s = time.perf_counter() - start
    torch.manual_seed(seed)
    model = VisionMamba(config)
    task = ImageTask(train, val, classes, config)
    cfg = run.engine_config(out, {"from_scratch": asdict(config)},
                            {"type": "pretrain-vim", "corpus": str(path), "validation": validation},
                            steps, batch_size, lr, seed, warmup, eval_every, weight_decay, device)
    result, train_s, step_s = run.train(cfg, task, model)
    model.cpu().save_pretrained(out)
    best = result["best_validation"]
    summary = {
        "model": "VisionMamba", "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (out / "model.safetensors").stat().st_size, "config": asdict(config),
        "corpus": {"file": str(path), "images": {k: len(v[0]) for k, v in sources.items()},
                   "train_images": len(train), "validation_images": len(val),
                   "classes": {k: list(v) for k, v in classes.items()},
                   "preprocessing": "grayscale to RGB, bicubic resize, ImageNet normalisation (vision/data.py)"},
        "training": {**cfg["training"], "epochs": round(steps * batch_size / len(train), 2)},
        "result": {"steps": result["steps"], "best_step": result["best_step"], "validation": best},
        "seconds": {"prepare": round(prepare_s, 1), "train": round(train_s, 1),
                    "median_step": round(step_s, 4) if step_s else None},
        "device": run.device_name(cfg["training"]["device"]), "torch": torch.__version__}
    run.write_summary(out, summary)
    return summary
