"""Image files: which names are images, and decoding them with PIL (the one place the package opens an image).

`load_image` decodes a whole image as RGB (datasets, the DALI loader's second opinion, panels, export checks);
`load_image_reduced` decodes a large photo at a reduced scale for prediction; `check_image_sizes` reads headers
only. Every failure is a DatasetError naming the file.
"""
from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str) -> Image.Image:
    """Decode an image fully as RGB; any failure is a DatasetError naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() decodes the whole image, so truncation shows up here
    except FileNotFoundError as e:
        raise DatasetError("image file does not exist", path) from e
    except UnidentifiedImageError as e:
        raise DatasetError("not an image PIL can read (corrupt or wrong format)", path) from e
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image too large to decode safely: {e}", path) from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, bad headers, decoder errors
        raise DatasetError(f"corrupt or truncated image: {e}", path) from e


def list_images(inputs) -> list[str]:
    """Image files from a list of files and folders (folders: every image file below them, sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item) for f in names
                           if is_image_file(f))
            if not found:
                raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder", item)
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DatasetError("neither a file nor a folder", item)
    return files


def check_image_sizes(files, max_megapixels: float) -> None:
    """Every image's header (nothing decoded): one larger than --max-megapixels stops the run before any work,
    naming it (decoding it, and its full-size map, would take gigabytes)."""
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the limit is checked here, in one line
    try:
        for path in files:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Exception as e:  # PIL raises several types for unreadable files
                raise DatasetError(f"cannot read the image: {type(e).__name__}: {e}", path) from e
            if w * h > max_megapixels * 1e6:
                raise DatasetError(f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels, above the "
                                   f"{max_megapixels:g}-megapixel limit (raise it with --max-megapixels)", path)
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def load_image_reduced(path: str, min_side: int = 0):
    """(RGB image, original (w, h), the image's region that holds the original: (0, 0, w', h'), fractional
    where a side is not a multiple of the scale). A large image is decoded smaller, at least `min_side` on
    each side: JPEGs by the decoder's DCT scaling (draft: 1/2, 1/4 or 1/8; memory and time fall with the scale
    squared), other formats by an integer box reduction."""
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # sizes were checked by check_image_sizes
    try:
        with Image.open(path) as im:
            size = im.size
            factor = min(size) // min_side if min_side else 1
            region = (0.0, 0.0, float(size[0]), float(size[1]))
            if factor >= 2 and im.format == "JPEG":
                # the smallest scale still >= min_side on both sides; ceil(w / scale) pixels are decoded
                drafted = im.draft("RGB", (min_side, min_side))
                region = drafted[1] if drafted else region
            rgb = im.convert("RGB")
            if factor >= 2 and im.format != "JPEG":
                rgb, region = rgb.reduce(factor), (0.0, 0.0, size[0] / factor, size[1] / factor)
            return rgb, size, region
    except Exception as e:  # PIL raises several types for unreadable files
        raise DatasetError(f"cannot read the image: {type(e).__name__}: {e}", path) from e
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
