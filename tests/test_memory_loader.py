"""dbc_fast.data.memory.DeviceDataset on real Tiny ImageNet images: the torch loader's pixels and boxes exactly,
the paper's crop + flip per image, and epochs that are reproducible and resumable from any step."""
import numpy as np
import pytest
import torch
from PIL import Image

from dbc_fast.data import build_dataset, collate, load_image, train_resize_size
from dbc_fast.data.memory import DeviceDataset
from dbc_fast.data.transforms import to_normalized_tensor

IMG = 32


@pytest.fixture(scope="module")
def mini(shared_data):
    return str(shared_data / "tiny-imagenet-mini.tar.gz")


def test_eval_batches_equal_the_torch_loader(mini):
    dataset = build_dataset("tiny-imagenet", mini, "val", img_size=IMG, train=False)
    memory = DeviceDataset(dataset, "cpu", train=False, batch_size=7, progress=False)
    assert len(memory) == -(-len(dataset) // 7)
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, collate_fn=collate)
    for ours, ref in zip(memory, loader, strict=True):
        assert torch.equal(ours["image"], ref["image"])  # bit-identical: same resize, same arithmetic
        assert torch.equal(ours["label"], ref["label"]) and torch.equal(ours["index"], ref["index"])
        assert ours["path"] == ref["path"] and ours["orig_size"] == ref["orig_size"]
        for a, b in zip(ours["boxes"], ref["boxes"], strict=True):
            assert torch.equal(a, b)


def candidate_crops(path: str) -> list[torch.Tensor]:
    """Every S x S crop (and its mirror) of the R x R training resize, as TrainTransform would normalise it."""
    r = train_resize_size(IMG)
    resized = load_image(path).resize((r, r), Image.BILINEAR)
    out = []
    for top in range(r - IMG + 1):
        for left in range(r - IMG + 1):
            crop = resized.crop((left, top, left + IMG, top + IMG))
            out += [to_normalized_tensor(crop), to_normalized_tensor(crop.transpose(Image.FLIP_LEFT_RIGHT))]
    return out


def test_train_batches_are_crops_and_flips_of_the_training_resize(mini):
    dataset = build_dataset("tiny-imagenet", mini, "train", img_size=IMG, train=True)
    memory = DeviceDataset(dataset, "cpu", train=True, batch_size=16, progress=False)
    assert memory.images.shape == (len(dataset), 3, train_resize_size(IMG), train_resize_size(IMG))
    assert memory.train_steps() == len(dataset) // 16
    batch = next(memory.train_batches(epoch=0, seed=3))
    assert batch["image"].shape == (16, 3, IMG, IMG) and batch["image"].dtype == torch.float32
    labels = torch.tensor([s.label for s in dataset.samples])
    flips = 0
    for image, label in zip(batch["image"], batch["label"]):
        # which training image this is: the one whose candidate crops contain it, bit for bit
        matches = []
        for i, sample in enumerate(dataset.samples):
            if labels[i] != label:
                continue
            for k, crop in enumerate(candidate_crops(sample.path)):
                if torch.equal(crop, image):
                    matches.append((i, k % 2))
        assert len({i for i, _ in matches}) == 1, matches
        flips += matches[0][1]
    assert 0 < flips < 16  # both orientations occur (p = 0.5 each)


def test_epochs_are_permutations_reproducible_and_resumable(mini):
    dataset = build_dataset("tiny-imagenet", mini, "train", img_size=IMG, train=True)
    memory = DeviceDataset(dataset, "cpu", train=True, batch_size=24, progress=False)
    first = list(memory.train_batches(epoch=1, seed=0))
    assert len(first) == memory.train_steps() == len(dataset) // 24
    again = list(memory.train_batches(epoch=1, seed=0))
    resumed = list(memory.train_batches(epoch=1, seed=0, start_step=3))
    other_epoch = list(memory.train_batches(epoch=2, seed=0))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    for a, b in zip(first[3:], resumed, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not all(torch.equal(a["label"], b["label"]) for a, b in zip(first, other_epoch))
    # an epoch draws each image at most once: label counts never exceed the class sizes
    counts = np.bincount(torch.cat([b["label"] for b in first]).numpy(), minlength=dataset.num_classes)
    class_sizes = np.bincount([s.label for s in dataset.samples], minlength=dataset.num_classes)
    assert (counts <= class_sizes).all() and counts.sum() == len(first) * 24


def test_channels_last_and_bad_arguments(mini):
    dataset = build_dataset("tiny-imagenet", mini, "val", img_size=IMG, train=False)
    memory = DeviceDataset(dataset, "cpu", train=False, batch_size=8, channels_last=True, progress=False)
    image = next(iter(memory))["image"]
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(image, torch.stack([dataset[i]["image"] for i in range(8)]))
    serial = DeviceDataset(dataset, "cpu", train=False, batch_size=8, num_workers=1, progress=False)
    assert torch.equal(serial.images, memory.images) and serial.orig_sizes == memory.orig_sizes
    with pytest.raises(RuntimeError, match="train=True"):
        next(memory.train_batches(0))
    with pytest.raises(ValueError, match="batch_size"):
        DeviceDataset(dataset, "cpu", train=False, batch_size=0)
