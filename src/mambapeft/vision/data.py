"""Image classification data: the VTAB-1k folder layout and a plain class-per-folder layout.

VTAB-1k: one folder per task holding the images and the lists `train800.txt`, `val200.txt`,
`train800val200.txt` and `test.txt`, one "relative/path label" per line (the path relative to the
task folder; the label an integer from 0).
Class per folder: `ROOT/train/<class>/<image>` (and `ROOT/val/...`, `ROOT/test/...` when there
are such splits), or `ROOT/<class>/<image>` for a training set alone; classes are numbered in
sorted order of the training split's folder names.

Images are decoded with Pillow in the dataset's __getitem__, so DataLoader worker processes do the
decoding. (torchvision's transforms would be the usual tool, but its wheels cannot be imported beside
the pinned CPU torch: "operator torchvision::nms does not exist".) The transform is the protocol's:
RGB, a bicubic resize to size x size, ImageNet mean/std normalisation, no augmentation.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..io import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VTAB_LISTS = ("train800", "val200", "train800val200", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


class DataError(CheckpointError):
    """An unusable data file; the message names the file (and the list line) and what was expected."""


@dataclass(frozen=True)
class Sample:
    path: str    # absolute path of the image
    label: int
    where: str   # "list.txt:12" or the image path: what an error message names


def rgb_pixels(im: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) uint8: RGB, bicubic resize (PIL's, with its antialiasing). The protocol's
    transform before scaling; also used on images held in arrays (mambapeft.pretrain.images)."""
    im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


_CONSTANTS = {}   # (device, mean, std) -> tensors: a copy to the GPU in every step would wait for it


def normalise(pixels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 scaled to [0, 1] and normalised per channel, on pixels' device."""
    key = (pixels.device, tuple(mean), tuple(std))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = tuple(torch.tensor(v, device=pixels.device).view(3, 1, 1) for v in (mean, std))
    m, s = _CONSTANTS[key]
    return (pixels.float().div_(255) - m) / s


def load_image(sample: Sample, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [0, 1]: RGB, bicubic resize (PIL's, with its antialiasing)."""
    try:
        with Image.open(sample.path) as im:
            pixels = rgb_pixels(im, size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{sample.where}: cannot decode image {sample.path} ({e})") from None
    return pixels.float().div_(255)


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> (normalised image (3, size, size), label); pickles, so workers can decode."""

    def __init__(self, samples, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.samples, self.size = list(samples), size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return (load_image(s, self.size) - self.mean) / self.std, s.label


def collate(items):
    images, labels = zip(*items)
    return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long)}


def read_list(list_file, root=None) -> list[Sample]:
    """The samples of a VTAB-1k list file; paths are relative to `root` (default: the list's folder)."""
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    try:
        lines = list_file.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{list_file}: list file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{list_file}: cannot read the list ({e})") from None
    samples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{list_file}:{n}"
        parts = line.strip().rsplit(None, 1)   # the path may hold spaces, the label cannot
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{where}: expected 'relative/path label' (an integer label), got {line.strip()!r}")
        rel, label = parts[0], int(parts[1])
        if label < 0:
            raise DataError(f"{where}: label {label} out of range: labels start at 0")
        path = root / rel
        if not path.is_file():
            raise DataError(f"{where}: image {rel} not found (looked for {path})")
        samples.append(Sample(str(path), label, where))
    if not samples:
        raise DataError(f"{list_file}: the list holds no samples")
    return samples


def check_labels(samples, num_classes):
    for s in samples:
        if s.label >= num_classes:
            raise DataError(f"{s.where}: label {s.label} out of range: the task has {num_classes} classes "
                            f"(labels 0..{num_classes - 1})")


def check_images(samples):
    """Read every image's header (Pillow opens lazily), so that a file that is no image stops the run
    before training rather than at the test set 100 epochs later. A file that is cut short past its
    header is found when it is decoded."""
    for s in samples:
        try:
            with Image.open(s.path) as im:
                im.size  # noqa: B018 - the header is parsed by open()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{s.where}: {s.path} is not a readable image ({e})") from None


class ImageData:
    """The splits of one data set: `splits` maps a split name to its samples; `num_classes`."""

    def __init__(self, root, splits: dict, num_classes: int, layout: str, classes=None):
        self.root, self.splits, self.num_classes, self.layout, self.classes = root, splits, num_classes, layout, classes

    def split(self, name, source="task"):
        if name not in self.splits:
            raise DataError(f"{source}: {self.root} has no split {name!r}; it has {', '.join(self.splits)}")
        return self.splits[name]


def open_vtab(root, num_classes=None) -> ImageData:
    """A VTAB-1k task folder. The number of classes is `num_classes`, or one more than the largest
    label of all its lists (the test list included: sun397's 1000 training images miss classes)."""
    root = Path(root)
    splits = {name: read_list(root / f"{name}.txt", root) for name in VTAB_LISTS if (root / f"{name}.txt").is_file()}
    if not splits:
        raise DataError(f"{root}: not a VTAB-1k task folder: none of {', '.join(n + '.txt' for n in VTAB_LISTS)}")
    n = num_classes or 1 + max(s.label for samples in splits.values() for s in samples)
    for samples in splits.values():
        check_labels(samples, n)
    return ImageData(root, splits, n, "vtab")


def open_class_folders(root, num_classes=None) -> ImageData:
    """`root/{train,val,test}/<class>/<image>`, or `root/<class>/<image>` (training split alone)."""
    root = Path(root)
    split_dirs = {n: root / n for n in ("train", "val", "test") if (root / n).is_dir()}
    if "train" not in split_dirs:
        if split_dirs:
            raise DataError(f"{root}: has {', '.join(split_dirs)} but no train/ folder")
        split_dirs = {"train": root}
    classes = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{split_dirs['train']}: no class folders (expected <class>/<image> inside)")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name, d in split_dirs.items():
        samples = []
        for c in sorted(x.name for x in d.iterdir() if x.is_dir()):
            if c not in index:
                raise DataError(f"{d / c}: class folder {c!r} is not among the training classes")
            files = sorted(f for f in (d / c).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            samples += [Sample(str(f), index[c], str(f)) for f in files]
        if not samples:
            raise DataError(f"{d}: no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
        splits[name] = samples
    n = num_classes or len(classes)
    if n < len(classes):
        raise DataError(f"{root}: {len(classes)} class folders but num_classes={n}")
    return ImageData(root, splits, n, "folders", classes)


def open_image_data(root, num_classes=None) -> ImageData:
    """A VTAB-1k task folder when it holds a list file, else a class-per-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    if any((root / f"{n}.txt").is_file() for n in VTAB_LISTS):
        return open_vtab(root, num_classes)
    return open_class_folders(root, num_classes)


def plain_message(error):
    """The message of an error raised in a DataLoader worker process, without the worker's traceback
    that the DataLoader puts in front of it when it re-raises it in the main process."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    kind, sep, rest = last.partition(": ")
    return rest if sep and kind.endswith(("Error", "Exception")) else last


def default_workers():
    """DataLoader workers for decoding: a few, never more than the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(8, max(0, cores - 1))
