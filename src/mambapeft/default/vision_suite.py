"""The vision suite in the VTAB-1k folder layout: per task a folder of PNG images and the lists
train800.txt, val200.txt, train800val200.txt and test.txt ("images/NAME.png label").

natural: digits (scikit-learn's 8x8 digits), clothing (Fashion-MNIST, 28x28);
specialized: noise (which noise fills the image), texture (stripes, checks, dots or a gradient);
structured: count (how many discs, 1-5), position (which cell of a 3x3 grid holds the square),
orientation (a bar at 0, 45, 90 or 135 degrees). Procedural images are 32x32, drawn from the seed."""
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_path
from .sources import SourceError

GROUPS = {"digits": "natural", "clothing": "natural", "noise": "specialized", "texture": "specialized",
          "count": "structured", "position": "structured", "orientation": "structured"}
S = 32   # side of the procedural images


def _noise(rng, k):
    r = np.random.default_rng(rng.getrandbits(32))
    base = r.uniform(60, 190)
    if k == 0:   # gaussian
        a = base + r.normal(0, r.uniform(20, 50), (S, S))
    elif k == 1:   # uniform
        w = r.uniform(40, 90)
        a = base + r.uniform(-w, w, (S, S))
    elif k == 2:   # salt and pepper
        a = np.full((S, S), base)
        m = r.random((S, S))
        p = r.uniform(0.05, 0.2)
        a[m < p / 2], a[m > 1 - p / 2] = 0, 255
    else:   # blocky: coarse noise upsampled
        c = r.integers(2, 5)
        a = base + np.kron(r.normal(0, 50, (S // (2 ** c) + 1, S // (2 ** c) + 1)), np.ones((2 ** c, 2 ** c)))[:S, :S]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def _texture(rng, k):
    y, x = np.mgrid[0:S, 0:S].astype(float)
    p, ph, th = rng.uniform(3, 8), rng.uniform(0, 6.3), rng.uniform(0, 3.14)
    u = x * np.cos(th) + y * np.sin(th)
    v = -x * np.sin(th) + y * np.cos(th)
    if k == 0:   # stripes
        a = np.sin(2 * np.pi * u / p + ph) > 0
    elif k == 1:   # checks
        a = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    elif k == 2:   # dots
        a = (np.mod(u, 2 * p) - p) ** 2 + (np.mod(v, 2 * p) - p) ** 2 < (p / 2) ** 2
    else:   # a smooth ramp across the image
        a = (u - u.min()) / (np.ptp(u) + 1e-9)
    lo, hi = rng.randint(0, 90), rng.randint(160, 255)
    if k == 3:
        return Image.fromarray((lo + a * (hi - lo)).astype(np.uint8), "L")
    return Image.fromarray(np.where(a, hi, lo).astype(np.uint8), "L")


def _canvas(rng):
    bg = tuple(rng.randint(0, 80) for _ in range(3))
    im = Image.new("RGB", (S, S), bg)
    return im, ImageDraw.Draw(im), tuple(rng.randint(150, 255) for _ in range(3))


def _count(rng, k):
    im, d, fg = _canvas(rng)
    placed = []
    while len(placed) < k + 1:   # labels 0..4 are 1..5 discs, apart from each other
        r = rng.randint(2, 4)
        cx, cy = rng.randint(r, S - 1 - r), rng.randint(r, S - 1 - r)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 1) ** 2 for x, y, q in placed):
            placed.append((cx, cy, r))
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    return im


def _position(rng, k):
    im, d, fg = _canvas(rng)
    cell = S // 3
    w = rng.randint(4, cell - 2)
    x0 = (k % 3) * cell + rng.randint(0, cell - w)
    y0 = (k // 3) * cell + rng.randint(0, cell - w)
    d.rectangle((x0, y0, x0 + w - 1, y0 + w - 1), fill=fg)
    return im


def _orientation(rng, k):
    im, d, fg = _canvas(rng)
    angle = np.deg2rad(45 * k + rng.uniform(-8, 8))
    half = rng.uniform(8, 13)
    cx, cy = rng.uniform(12, S - 12), rng.uniform(12, S - 12)
    dx, dy = half * np.cos(angle), -half * np.sin(angle)
    d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fg, width=rng.randint(2, 4))
    return im


PROCEDURAL = {"noise": (_noise, 4), "texture": (_texture, 4), "count": (_count, 5), "position": (_position, 9),
              "orientation": (_orientation, 4)}


def _procedural(draw, classes, rng, n):
    labels = [i % classes for i in range(n)]
    rng.shuffle(labels)
    return [(draw(rng, k), k) for k in labels]


def _sample(images, labels, idx):
    return [(Image.fromarray(images[i], "L"), int(labels[i])) for i in idx]


def make_tasks(digits, fashion, n_train, n_test, seed):
    """{task: (train [(image, label)], test [(image, label)])}: seeded. digits: (images, labels);
    fashion: {"train": ..., "test": ...}; the clothing task's test images come from Fashion-MNIST's
    test split, its training images from the training split."""
    rng = random.Random(seed)
    tasks = {}
    if digits is not None:
        order = list(range(len(digits[1])))
        rng.shuffle(order)
        if len(order) < n_train + n_test:
            raise SourceError(f"digits: {len(order)} images, the suite needs {n_train + n_test} "
                              f"({n_train} train + {n_test} test); lower --train or --test")
        tasks["digits"] = (_sample(*digits, order[n_test:n_test + n_train]), _sample(*digits, order[:n_test]))
    if fashion is not None:
        tr = rng.sample(range(len(fashion["train"][1])), n_train)
        te = rng.sample(range(len(fashion["test"][1])), n_test)
        tasks["clothing"] = (_sample(*fashion["train"], tr), _sample(*fashion["test"], te))
    for name, (draw, classes) in PROCEDURAL.items():
        items = _procedural(draw, classes, rng, n_train + n_test)
        tasks[name] = (items[n_test:], items[:n_test])
    return tasks


def write_suite(out_dir, tasks):
    """OUT/TASK/images/*.png and the four VTAB-1k lists; the training items split 80/20 into
    train800 and val200 (800/200 for 1,000 items)."""
    out_dir = Path(out_dir)
    for name, (train, test) in tasks.items():
        folder = out_dir / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        n_val = len(train) // 5
        lists = {"train800": train[:len(train) - n_val], "val200": train[len(train) - n_val:], "test": test}
        lines = {}
        for split, items in lists.items():
            lines[split] = []
            for i, (im, label) in enumerate(items):
                rel = f"images/{split}_{i:05d}.png"
                im.save(folder / rel, optimize=False)
                lines[split].append(f"{rel} {label}")
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, ls in lines.items():
            with atomic_path(folder / f"{split}.txt") as tmp:
                tmp.write_text("\n".join(ls) + "\n")
    return sorted(out_dir / n for n in tasks)
