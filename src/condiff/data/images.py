"""Datasets from image files: a folder of class sub-folders, or images with a CSV of binary attributes, read with
Pillow into float32 (N, C, H, W) in [-1, 1] at one resolution. A file that cannot be read faithfully (transparent
pixels, values out of range) is refused naming it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from condiff.data.datasets import DataError, DataNotFound, LabelledDataset, to_unit_range

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _opaque(image, path: Path):
    """The image without its alpha channel, refused if any pixel is not fully opaque: the colour
    behind a transparent pixel is unknown, and any background would be a guess."""
    from PIL import Image

    mode = image.mode
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # the palette's per-entry alpha becomes a channel to check
    *colour, alpha = image.getbands()
    if alpha in ("A", "a"):
        transparent = image.getchannel(alpha).getextrema()[0] < 255
        image = Image.merge("RGB" if len(colour) == 3 else "L", image.split()[:-1])  # also "La"/"RGBa"
    elif "transparency" in image.info:  # one colour (PNG's tRNS chunk) marks the transparent pixels
        key = np.asarray(image.info["transparency"]).reshape(-1)
        transparent = (np.asarray(image).reshape(image.height, image.width, -1) == key).all(-1).any()
    else:
        return image
    if transparent:
        raise DataError(f"{path}: image mode {mode} has pixels that are not fully opaque; condiff does not "
                        "guess a background, so flatten the image onto one (or drop its alpha) first")
    return image


def _unit_values(image, path: Path) -> np.ndarray | None:
    """The pixels of a 16-bit integer or float image as float32 in [0, 1]; None for 8-bit modes."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):  # no full scale to divide by
            raise DataError(f"{path}: image mode I holds values {values.min()}..{values.max()}, "
                            "outside 0..65535; condiff reads 32-bit integer images as 16-bit ones")
        return values.astype(np.float32) / 65535
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            raise DataError(f"{path}: image mode F holds non-finite values (NaN or infinity)")
        if values.min() < 0 or values.max() > 1:
            raise DataError(f"{path}: image mode F holds values {values.min():g}..{values.max():g}, "
                            "outside [0, 1], the range condiff reads float images in")
        return values
    return None


def _read_image(image, path: Path, resolution: int, channels: int) -> torch.Tensor:
    """One open image -> (channels, resolution, resolution) in [-1, 1]: its largest centred square,
    resized, with 0..255, 0..65535 or 0.0..1.0 (float) spanning the range."""
    from PIL import Image, ImageOps

    image = _opaque(image, path)
    size, bicubic = (resolution, resolution), Image.Resampling.BICUBIC
    values = _unit_values(image, path)
    if values is None:  # 8-bit: PIL's conversions (palette, CMYK, bilevel to 0/255, luma from RGB)
        target = "RGB" if channels == 3 else "L"
        try:
            image = image.convert(target)
        except ValueError as err:
            raise DataError(f"{path}: cannot convert image mode {image.mode} to {target} ({err})") from None
        return to_unit_range(np.asarray(ImageOps.fit(image, size, bicubic))[None])[0]
    # Resized as a float image, then clipped like 8-bit images, whose bicubic overshoot saturates.
    fitted = np.asarray(ImageOps.fit(Image.fromarray(values), size, bicubic)).clip(0.0, 1.0)
    return torch.from_numpy(fitted * 2 - 1).expand(channels, -1, -1)  # gray repeated as RGB, as "L" -> "RGB"


def _load_images(paths: list[Path], resolution: int, channels: int) -> torch.Tensor:
    """Image files -> (N, C, resolution, resolution) in [-1, 1]: the largest centred square of each
    image, resized (so that faces or objects keep their proportions), in grayscale or RGB."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    images = torch.empty((len(paths), channels, resolution, resolution), dtype=torch.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                images[i] = _read_image(image, path, resolution, channels)
        except FileNotFoundError:
            raise DataNotFound(f"{path}: image not found") from None
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: cannot read the image ({err})") from None
    return images


def image_folder_classes(root: str | Path) -> list[str]:
    """The class names of an image folder: its sub-folders' names, sorted (class c = the c-th)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFound(f"{root}: directory not found; an image folder holds one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataNotFound(f"{root}: no class sub-folders; an image folder holds one sub-folder of images per class")
    return classes


def load_image_folder(root: str | Path, resolution: int, channels: int = 3) -> LabelledDataset:
    """Images in root/<class name>/*.png|jpg|...; classes are the sorted sub-folder names (label c is
    class_names[c]); every image is centre-cropped to a square and resized to resolution x resolution."""
    root = Path(root).expanduser()
    class_names = image_folder_classes(root)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataNotFound(f"{root / name}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += files
        labels += [label] * len(files)
    return LabelledDataset(_load_images(paths, resolution, channels), torch.tensor(labels), len(class_names),
                           root.name, class_names)


def load_image_csv(images_dir: str | Path, csv_path: str | Path, column: str, resolution: int,
                   channels: int = 3, id_column: str = "image_id") -> LabelledDataset:
    """Images plus a CSV of binary attributes, Celeb-A style (list_attr_celeba.csv: an `image_id`
    column of file names and one column per attribute with values -1/1 or 0/1). The label is
    `column`: 1 where the attribute is 1, else 0. Images are centre-cropped and resized as above."""
    images_dir, csv_path = Path(images_dir).expanduser(), Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DataNotFound(f"{csv_path}: attribute CSV not found (e.g. Celeb-A's list_attr_celeba.csv)")
    if not images_dir.is_dir():
        raise DataNotFound(f"{images_dir}: image directory not found (e.g. Celeb-A's img_align_celeba/)")
    with csv_path.open(newline="") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{csv_path}: not a UTF-8 text CSV ({err.reason}); if it is compressed, "
                            "decompress it first") from None
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    for needed in (id_column, column):
        if needed not in header:
            raise DataNotFound(f"{csv_path}: no column {needed!r} (columns: {', '.join(header[:8])}"
                               f"{', ...' if len(header) > 8 else ''})")
    rows = list(reader)
    values = {"1": 1, "-1": 0, "0": 0}
    labels = []
    for line, row in enumerate(rows, start=2):
        value = (row[column] or "").strip()
        if value not in values:
            raise DataError(f"{csv_path}:{line}: column {column!r} holds {value!r}, expected -1/1 or 0/1")
        labels.append(values[value])
    paths = [images_dir / row[id_column].strip() for row in rows]
    return LabelledDataset(_load_images(paths, resolution, channels), torch.tensor(labels, dtype=torch.long), 2,
                           f"{csv_path.stem}:{column}", [f"not {column}", column])
