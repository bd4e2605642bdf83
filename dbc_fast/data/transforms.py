"""Image + box transforms of the paper (section 4.1), for any size S that is a multiple of 32.

train: resize to R x R with R = round(S * 256 / 224) (256 for S = 224), random S x S crop, horizontal
       flip with probability 0.5, ImageNet mean/std normalisation.
eval:  resize to S x S (no crop), normalisation; boxes scaled the same way.

Resizing is PIL bilinear (what torchvision's Resize does on PIL images; PIL filters over the whole
source footprint when shrinking). Boxes are scaled as `x * S / w` (multiply first, so an integer result
is exact in float32, the same numbers as wsolevaluation's float64 `resize_bbox` before it truncates).
`w, h` is the size the boxes refer to (the metadata size where the source has one, as wsolevaluation
does), which may differ from the decoded image's size (e.g. ilsvrc-val-300's images squashed to 227x227).
Train boxes: after the crop they are clipped to [0, S - 1] (boxes entirely outside the crop are dropped),
and the flip maps the inclusive pixel column x to S - 1 - x. The random numbers come from torch's RNG, so
DataLoader worker seeding makes them reproducible. The draws and their order (crop left, crop top, flip)
are part of the contract (draw_train_params): the DALI loader reproduces them with train_params.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


STRIDE = 32  # the backbone downsamples by 32: input sides must be multiples of it


def check_img_size(img_size: int, name: str = "img_size") -> int:
    """`img_size` as an int if it is a positive multiple of STRIDE, else a ValueError that says so."""
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size <= 0 or img_size % STRIDE:
        raise ValueError(f"{name} must be a positive multiple of {STRIDE} (the model downsamples by {STRIDE}), "
                         f"got {img_size!r}".lstrip())
    return int(img_size)


def train_resize_size(img_size: int) -> int:
    """The square side images are resized to before the random crop: 256 for 224, 73 for 64, 146 for 128."""
    return int(round(img_size * 256 / 224))


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


def scale_boxes(boxes: np.ndarray, size: tuple[int, int], new_w: int, new_h: int) -> np.ndarray:
    """Boxes in the pixels of `size` = (w, h) -> pixels of a (new_w, new_h) resize of that image."""
    w, h = size
    out = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    out[:, 0::2] = out[:, 0::2] * new_w / w
    out[:, 1::2] = out[:, 1::2] * new_h / h
    return out


class EvalTransform:
    def __init__(self, img_size: int = 224):
        self.img_size = check_img_size(img_size)

    def __call__(self, image: Image.Image, boxes: np.ndarray, size: tuple[int, int]):
        s = self.img_size
        image = image.resize((s, s), Image.BILINEAR)
        boxes = scale_boxes(boxes, size, s, s)
        return to_normalized_tensor(image), torch.from_numpy(boxes.astype(np.float32))

    def __repr__(self):
        return f"EvalTransform(resize {self.img_size}x{self.img_size}, normalize)"


class TrainTransform:
    def __init__(self, img_size: int = 224, flip_prob: float = 0.5):
        self.img_size = check_img_size(img_size)
        self.resize = train_resize_size(self.img_size)
        self.flip_prob = flip_prob

    def __call__(self, image: Image.Image, boxes: np.ndarray, size: tuple[int, int]):
        s, r = self.img_size, self.resize
        left, top, flip = draw_train_params(s, self.flip_prob)
        image = image.resize((r, r), Image.BILINEAR).crop((left, top, left + s, top + s))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        boxes = train_boxes(boxes, size, s, left, top, flip)
        return to_normalized_tensor(image), torch.from_numpy(boxes.astype(np.float32).reshape(-1, 4))

    def __repr__(self):
        return (f"TrainTransform(resize {self.resize}x{self.resize}, random crop {self.img_size}, "
                f"flip p={self.flip_prob}, normalize)")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 31-bit seed that depends only on (seed, epoch, index)."""
    return zlib.crc32(f"{seed}/{epoch}/{index}".encode()) & 0x7FFFFFFF


def draw_train_params(img_size: int, flip_prob: float = 0.5, generator=None) -> tuple[int, int, bool]:
    """(left, top, flip) of one training crop: the draws, in this order, from torch's RNG (or `generator`)."""
    span = train_resize_size(img_size) - img_size + 1
    left = int(torch.randint(0, span, (), generator=generator).item())
    top = int(torch.randint(0, span, (), generator=generator).item())
    flip = bool(torch.rand((), generator=generator).item() < flip_prob)
    return left, top, flip


def train_params(seed: int, epoch: int, index: int, img_size: int) -> tuple[int, int, bool]:
    """(left, top, flip) of sample `index` in `epoch`: the draws TrainTransform makes from torch's RNG
    after the PyTorch loader seeds it with sample_seed(seed, epoch, index)."""
    g = torch.Generator()
    g.manual_seed(sample_seed(seed, epoch, index))
    return draw_train_params(img_size, 0.5, g)


def train_boxes(boxes: np.ndarray, size: tuple[int, int], img_size: int, left: int, top: int,
                flip: bool) -> np.ndarray:
    """Boxes in the pixels of `size` = (w, h) -> pixels of the S x S training crop at (left, top) of the R x R
    resize, flipped if `flip`: clipped to [0, S - 1], boxes entirely outside the crop dropped."""
    s, r = img_size, train_resize_size(img_size)
    out = scale_boxes(boxes, size, r, r)
    out[:, 0::2] -= left
    out[:, 1::2] -= top
    inside = (out[:, 0] <= s - 1) & (out[:, 1] <= s - 1) & (out[:, 2] >= 0) & (out[:, 3] >= 0)
    out = np.clip(out[inside], 0, s - 1)
    if flip:
        out = np.stack([s - 1 - out[:, 2], out[:, 1], s - 1 - out[:, 0], out[:, 3]], axis=1)
    return out
