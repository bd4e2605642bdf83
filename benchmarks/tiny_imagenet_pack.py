"""Split the Tiny ImageNet archive into two archives that each fit one device call (64 MiB carried per call).

    python benchmarks/tiny_imagenet_pack.py --out .carry/tiny   # -> .carry/tiny/core.tar.gz, .carry/tiny/extra.tar.gz

`core.tar.gz` is a complete dataset in the native layout: wnids.txt, words.txt, every box file, all 6,000
validation images and the first `--core-per-class` training images of each class (in the order of the class's box
file). `extra.tar.gz` holds the remaining training images only. Unpacked into one folder they give the whole set
back, file for file; `core` alone is a usable subset (build it with `missing_images="skip"`, which leaves out the
training images whose files are absent and says how many). A device call can carry `extra` first and the next
call `core`, so an experiment that loses the machine between the two still runs on the core subset.
"""
from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

from dbc_fast.data.archive import resolve_root


def split_members(root: Path, core_per_class: int) -> tuple[list[Path], list[Path]]:
    """(core files, extra files) relative to the dataset root."""
    core = [Path("wnids.txt"), Path("words.txt"), Path("val/val_annotations.txt")]
    core += sorted(p.relative_to(root) for p in (root / "val" / "images").iterdir())
    extra = []
    for wnid in (root / "wnids.txt").read_text().split():
        boxes = Path("train") / wnid / f"{wnid}_boxes.txt"
        names = [line.split()[0] for line in (root / boxes).read_text().splitlines() if line.strip()]
        images = [Path("train") / wnid / "images" / name for name in names]
        core += [boxes] + images[:core_per_class]
        extra += images[core_per_class:]
    return core, extra


def write_archive(root: Path, members: list[Path], path: Path, top: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tarfile.open(tmp, "w:gz", compresslevel=9) as tar:
        for rel in members:
            tar.add(root / rel, arcname=f"{top}/{rel.as_posix()}", recursive=False)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/tiny-imagenet-200-wsol.tar.gz",
                   help="Tiny ImageNet folder or archive (default ../shared/data/tiny-imagenet-200-wsol.tar.gz)")
    p.add_argument("--out", default=".carry/tiny", help="output folder (default .carry/tiny, git-ignored)")
    p.add_argument("--core-per-class", type=int, default=180,
                   help="training images per class in core.tar.gz (default 180 of 250: core ~58 MB)")
    args = p.parse_args(argv)
    if args.core_per_class < 1:
        p.error(f"--core-per-class must be at least 1, got {args.core_per_class}")
    root = resolve_root(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    core, extra = split_members(root, args.core_per_class)
    for name, members in (("core", core), ("extra", extra)):
        path = out / f"{name}.tar.gz"
        write_archive(root, members, path, root.name)
        print(f"{path}: {len(members)} files, {path.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
