"""Bad input, one row each: every row is a command line that must exit with code 2, print exactly one
line `condiff: error: ...` naming the offending field or file (no traceback), and leave every file
under its folder as it was, with nothing added or removed.

Configs, data files and run directories are built in the row's tmp_path, which is also the working
directory, so a default output (runs/NAME) would show up in the before/after snapshot."""

import gzip
import json
import os
import shutil
import struct
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image

from condiff.cli import main
from condiff.config import ConfigError

from conftest import check_refusal, run_cli, tiny_config_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py

DIGITS = {"dataset": "digits"}   # the [data] of rows about classes


def write_idx(path: Path, array, compress: bool = False, magic: bytes | None = None) -> Path:
    """An IDX file of unsigned bytes (magic 0x0000080N, N dimensions), as MNIST's."""
    array = np.asarray(array, dtype=np.uint8)
    magic = magic or bytes([0, 0, 0x08, array.ndim])
    raw = magic + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), value).save(path)
    return path


@dataclass
class Row:
    """What a row's setup gets: its folder (the working directory) and lazy access to the trained runs."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def config(self, changes: dict | None = None, output: str = "out") -> str:
        return tiny_config_file(self.tmp / "config.toml", self.tmp / output, changes)

    def copy_run(self, key: int | str = 16) -> Path:
        return Path(shutil.copytree(self.request.getfixturevalue("trained")[key], self.tmp / "run"))

    def resumable_run(self) -> tuple[Path, str]:
        """A copy of the hidden=16 run whose config names the copy, `latest` set back to step 2 (so that
        a resume that went ahead would train and write); returns (run, its config)."""
        run = self.copy_run()
        table = tomllib.loads((run / "config.toml").read_text()) | {"output_dir": str(run)}
        (run / "config.toml").write_text(tomli_w.dumps(table))
        (run / "checkpoints" / "latest").write_text("step-0000002")
        config = self.tmp / "tiny.toml"
        config.write_text(tomli_w.dumps(table))
        return run, str(config)

    def user_folder(self, name: str = "mine") -> Path:
        folder = self.tmp / name
        folder.mkdir()
        (folder / "thesis.tex").write_text("\\documentclass{article} % months of work\n")
        return folder

    def no_demo_training(self) -> None:
        """A demo that is not refused would train for minutes: make it fail at once instead."""
        def refuse(*args, **kwargs):
            raise AssertionError("the demo started training instead of refusing its output")
        import condiff.papers.demo
        import condiff.lifecycle.training
        self.monkeypatch.setattr(condiff.papers.demo, "train_run", refuse, raising=False)
        self.monkeypatch.setattr(condiff.papers.demo, "train_side_by_side", refuse, raising=False)
        self.monkeypatch.setattr(condiff.lifecycle.training, "train_run", refuse)


# Each row: id -> setup. setup(row) writes what the row needs and returns (argv, names): the line
# must contain one of `names` (a field, or the path of the offending file or folder; a tuple: all its parts).

def config_row(changes: dict, field: str):
    return lambda row: (["train", row.config(changes)], [field])


def bad_toml(row):
    (row.tmp / "config.toml").write_text("[train\nsteps = 5\n")
    return ["train", str(row.tmp / "config.toml")], [str(row.tmp / "config.toml")]


def missing_config(row):
    return ["train", str(row.tmp / "missing.toml")], [str(row.tmp / "missing.toml")]


def set_without_equals(row):
    return ["train", row.config(), "--set", "train.steps"], ["train.steps"]


def idx_argv(row, images: Path, labels: Path) -> list[str]:
    return ["train", row.config({"data": {"dataset": "idx", "path": str(images), "labels_path": str(labels)}})]


def idx_images_missing(row):
    labels = write_idx(row.tmp / "labels-idx1-ubyte", [0, 1, 0, 1])
    images = row.tmp / "missing-images-idx3-ubyte"
    return idx_argv(row, images, labels), [str(images)]


def idx_images_truncated_gzip(row):
    labels = write_idx(row.tmp / "labels-idx1-ubyte", [0, 1, 0, 1])
    images = write_idx(row.tmp / "images-idx3-ubyte.gz", np.zeros((4, 8, 8)), compress=True)
    images.write_bytes(images.read_bytes()[:-12])   # the tail: deflate end and CRC
    return idx_argv(row, images, labels), [str(images)]


def idx_labels_truncated_gzip(row):
    labels = write_idx(row.tmp / "labels-idx1-ubyte.gz", [0, 1, 0, 1], compress=True)
    labels.write_bytes(labels.read_bytes()[:len(labels.read_bytes()) // 2])
    images = write_idx(row.tmp / "images-idx3-ubyte", np.zeros((4, 8, 8)))
    return idx_argv(row, images, labels), [str(labels)]


def idx_corrupt_gzip(row):
    labels = write_idx(row.tmp / "labels-idx1-ubyte", [0, 1, 0, 1])
    images = write_idx(row.tmp / "images-idx3-ubyte.gz", np.zeros((4, 8, 8)), compress=True)
    raw = bytearray(images.read_bytes())
    raw[10] = 0xFF   # the first deflate block header, after gzip's 10 bytes: an invalid block type
    images.write_bytes(bytes(raw))
    return idx_argv(row, images, labels), [str(images)]


def idx_labels_gzip_crc_mismatch(row):
    labels = write_idx(row.tmp / "labels-idx1-ubyte.gz", [0, 1, 0, 1], compress=True)
    raw = bytearray(labels.read_bytes())
    raw[-8] ^= 0xFF   # the CRC-32 of gzip's trailer
    labels.write_bytes(bytes(raw))
    images = write_idx(row.tmp / "images-idx3-ubyte", np.zeros((4, 8, 8)))
    return idx_argv(row, images, labels), [str(labels)]


def idx_wrong_magic(row):
    labels = write_idx(row.tmp / "labels-idx1-ubyte", [0, 1, 0, 1])
    images = write_idx(row.tmp / "images-idx3-ubyte", np.zeros((4, 8, 8)), magic=struct.pack("<i", 0x803))
    return idx_argv(row, images, labels), [str(images)]


def idx_label_count_differs(row):
    labels = write_idx(row.tmp / "labels-idx1-ubyte", [0, 1, 0, 1, 0])
    images = write_idx(row.tmp / "images-idx3-ubyte", np.zeros((4, 8, 8)))
    return idx_argv(row, images, labels), [str(images), str(labels)]


def image_folder_argv(row, root: Path):
    return ["train", row.config({"data": {"dataset": "image-folder", "path": str(root), "resolution": 4,
                                          "channels": 1}})]


def pets_with_a_bad_dog_folder(row, dog_files: dict[str, str]) -> Path:
    """pets/cat holds images; pets/dog holds only `dog_files` (name -> text), none of them an image."""
    root = row.tmp / "pets"
    for i in range(3):
        write_image(root / "cat" / f"{i}.png")
    (root / "dog").mkdir()
    for name, text in dog_files.items():
        (root / "dog" / name).write_text(text)
    return root


def image_folder_non_images(row):
    root = pets_with_a_bad_dog_folder(row, {"x.png": "not a picture, only named like one", "notes.txt": "a note"})
    return image_folder_argv(row, root), [str(root / "dog" / "x.png")]


def image_folder_only_text(row):
    root = pets_with_a_bad_dog_folder(row, {"notes.txt": "a note"})
    return image_folder_argv(row, root), [str(root / "dog")]


def image_csv_argv(row, images: Path, csv_path: Path, column: str = "Smiling"):
    return ["train", row.config({"data": {"dataset": "image-csv", "path": str(images), "labels_path": str(csv_path),
                                          "column": column, "resolution": 4, "channels": 1}})]


def celeb(row, names=("000001.png", "000002.png")) -> tuple[Path, Path]:
    images = row.tmp / "img_align_celeba"
    for name in names:
        write_image(images / name)
    csv_path = row.tmp / "list_attr_celeba.csv"
    csv_path.write_text("image_id,Smiling\n000001.png,1\n000002.png,-1\n")
    return images, csv_path


def image_csv_ids_match_no_image(row):
    images, csv_path = celeb(row, names=("a.png", "b.png"))
    return image_csv_argv(row, images, csv_path), [str(images), str(csv_path)]


def image_csv_missing_column(row):
    images, csv_path = celeb(row)
    return image_csv_argv(row, images, csv_path, column="Bald"), [str(csv_path)]


def image_csv_gzipped(row):
    images, csv_path = celeb(row)
    csv_path.write_bytes(gzip.compress(csv_path.read_bytes()))
    return image_csv_argv(row, images, csv_path), [str(csv_path)]


def not_a_run(command: str):
    def setup(row):
        folder = row.user_folder()
        return [command, str(folder)], [str(folder)]
    return setup


def truncated_safetensors(row):
    run = row.copy_run()
    weights = run / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    return ["sample", str(run)], [str(weights), "diffusion_pytorch_model.safetensors"]


def checkpoint_of_another_model(row):
    run, config = row.resumable_run()
    other = row.request.getfixturevalue("trained")[32] / "checkpoints" / "step-0000002" / "model"
    for checkpoint in (run / "checkpoints").glob("step-*"):
        shutil.rmtree(checkpoint / "model")
        shutil.copytree(other, checkpoint / "model")
    return ["train", config, "--resume"], [str(run)]


def checkpoint_of_two_processes(row):
    run, config = row.resumable_run()
    for state_file in (run / "checkpoints").glob("step-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        state["ranks"]["1"] = state["ranks"]["0"]
        state_file.write_text(json.dumps(state, indent=1))
    return ["train", config, "--resume"], [str(run)]


def run_command(command: str, *options: str, key: int | str = 16, names=()):
    """`condiff COMMAND RUN OPTIONS...` on a copy of the trained run `key`; the line names one of `names`."""
    def setup(row):
        return [command, str(row.copy_run(key)), *options], list(names)
    return setup


def output_below_a_file(row):
    (row.tmp / "notes.txt").write_text("a user's notes\n")
    return ["train", row.config(output="notes.txt/run")], [str(row.tmp / "notes.txt" / "run")]


def output_in_a_symlink_loop(row):
    (row.tmp / "loop").symlink_to("loop")
    return ["train", row.config(output="loop/run")], [str(row.tmp / "loop" / "run")]


def output_in_a_read_only_folder(row):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the refusal cannot happen")
    (row.tmp / "locked").mkdir()
    (row.tmp / "locked").chmod(0o555)
    return ["train", row.config(output="locked/run")], [str(row.tmp / "locked" / "run")]


def random_metrics(row):
    run = row.copy_run()
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe" + np.random.default_rng(0).bytes(4096))
    return ["evaluate", str(run)], [str(run / "metrics.jsonl")]


def sampled_run(row, *options: str) -> tuple[Path, Path, dict]:
    """A copy of the hidden=16 run sampled with `options`: (run, its samples.npz, that file's arrays)."""
    run = row.copy_run()
    assert main(["sample", str(run), *options]) == 0
    with np.load(run / "samples.npz") as arrays:
        return run, run / "samples.npz", dict(arrays)


def damaged_samples(command: str, damage):
    """`condiff evaluate RUN`, or attribute --samples-file, on a samples.npz whose provenance still matches
    the drawing but whose arrays `damage(arrays)` changed."""
    def setup(row):
        run, path, arrays = sampled_run(row, *(["--record-x0"] if command == "attribute" else []))
        damage(arrays)
        with open(path, "wb") as file:
            np.savez(file, **arrays)
        options = ["--samples-file", str(path), "--samples", "2"] if command == "attribute" else []
        return [command, str(run), *options], [str(path)]
    return setup


def wrong_shape(arrays):
    arrays["samples"] = np.zeros((len(arrays["samples"]), 3), dtype=np.float32)   # 3-D points of a 2-D run


def with_nan(arrays):
    for name in ("samples", "x0_predictions"):
        if name in arrays:
            arrays[name][0, 0] = np.nan


def damaged_file(command: str, name: str, content: bytes, names: tuple[str, ...] = ()):
    """`condiff COMMAND RUN` (train: with --resume) on a copy of the hidden=16 run whose file `name` holds
    `content`, `latest` set back to step 2 (a resume that went ahead would train and write); the line names the
    file, or one of `names` (paths in the run)."""
    def setup(row):
        run = row.copy_run()
        (run / "checkpoints" / "latest").write_text("step-0000002")
        (run / name).write_bytes(content)
        argv = [command, str(run), *(["--resume"] if command == "train" else [])]
        return argv, [str(run / n) for n in names or [name]]
    return setup


def summary_with_control(control):
    """`condiff evaluate RUN` on a copy of the hidden=16 run whose summary.json records `control` as its last
    measured-control step."""
    def setup(row):
        run = row.copy_run()
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "control": control}))
        return ["evaluate", str(run)], [str(run / "summary.json")]
    return setup


def edited_config(command: str, changes: dict):
    """`condiff COMMAND RUN` on a copy of the hidden=16 run whose config.toml has the dotted `changes`."""
    def setup(row):
        run = row.copy_run()
        table = tomllib.loads((run / "config.toml").read_text())
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            table[section][key] = value
        (run / "config.toml").write_text(tomli_w.dumps(table))
        return [command, str(run)], [str(run / "config.toml")]
    return setup


def resume_an_edited_model(row):
    """The run's own config.toml with its [model] edited by hand, as a user writes (a comment): a resume that
    rewrote config.toml before refusing would change its bytes."""
    run = row.copy_run()
    (run / "checkpoints" / "latest").write_text("step-0000002")
    config = run / "config.toml"
    config.write_text(config.read_text().replace("hidden = 16", "hidden = 24   # wider, by hand"))
    return ["train", str(run), "--resume"], [str(config)]


def after_work(setup):
    """Mark a row refused only once the work is done (what it drew is not finite): its progress bars come first."""
    setup.after_work = True
    return setup


def demo_output_in_a_symlink_loop(row):
    row.no_demo_training()
    (row.tmp / "loop").symlink_to("loop")
    return ["demo", "--output", "loop/run"], ["loop/run"]


def name_row(name: str):
    return lambda row: (["train", row.config({"name": name})], ["config.toml: name: "])


def demo_overwrite_user_folder(row):
    row.no_demo_training()
    folder = row.user_folder()
    return ["demo", "--output", str(folder), "--overwrite"], [str(folder)]


def train_overwrite_user_folder(row):
    folder = row.user_folder()
    return ["train", row.config(output=folder.name), "--overwrite"], [str(folder)]


def demo_output_dot(overwrite: bool):
    def setup(row):
        row.no_demo_training()
        if overwrite:
            (row.tmp / "notes.txt").write_text("a user's file in the current directory\n")
        return ["demo", "--output", "."] + ["--overwrite"] * overwrite, ["current directory"]
    return setup


ROWS = {
    # config files
    "malformed TOML": bad_toml,
    "unknown key in a section": config_row({"train.bacth_size": 4}, "train.bacth_size"),
    "unknown top-level section": config_row({"trian.steps": 4}, "trian"),
    "string where int": config_row({"train.steps": "many"}, "train.steps"),
    "bool where int": config_row({"train.batch_size": True}, "train.batch_size"),
    "list where float": config_row({"train.lr": [0.001]}, "train.lr"),
    "train.steps = 0": config_row({"train.steps": 0}, "train.steps"),
    "train.batch_size = -4": config_row({"train.batch_size": -4}, "train.batch_size"),
    "negative train.lr": config_row({"train.lr": -0.001}, "train.lr"),
    "bogus dual.estimator": config_row({"dual.estimator": "bogus"}, "dual.estimator"),
    "bogus sample.method": config_row({"sample.method": "bogus"}, "sample.method"),
    "train.ema_decay = 1.0": config_row({"train.ema_decay": 1.0}, "train.ema_decay"),
    "constraint on a class the data lacks": config_row(
        {"data": DIGITS, "constraints.classes": [12], "constraints.gamma": 0.1}, "constraints.classes[0]"),
    "class count of a class the data lacks": config_row(
        {"data": DIGITS | {"class_counts": {"11": 5}}}, "data.class_counts.11"),
    "class listed twice": config_row(
        {"data": DIGITS, "constraints.classes": [4, 4], "constraints.gamma": 0.1}, "constraints.classes"),
    "infeasible KL bounds": config_row(
        {"data": DIGITS, "constraints.classes": [4, 5], "constraints.kl_bounds": [0.1, 0.2]}, "constraints.kl_bounds"),
    "target shares summing past 1": config_row(
        {"data": DIGITS, "constraints.classes": [4, 5], "constraints.target_shares": [0.6, 0.5]}, "constraints.target_shares"),
    "two constraint modes": config_row(
        {"data": DIGITS, "constraints.classes": [4], "constraints.gamma": 0.1, "constraints.thresholds": [0.05]},
        "constraints"),
    "diffusion.beta_end = 1.5": config_row({"diffusion.beta_end": 1.5}, "diffusion.beta_end"),
    "diffusion.beta_end = 0.5: alphas_cumprod reach 0": config_row({"diffusion.beta_end": 0.5}, "diffusion.beta_end"),
    "scaled_linear alphas_cumprod reach 0": config_row(
        {"diffusion.beta_schedule": "scaled_linear", "diffusion.beta_end": 0.4}, "diffusion.beta_end"),
    "diffusion.beta_start = 0": config_row({"diffusion.beta_start": 0.0}, "diffusion.beta_start"),
    "diffusion.beta_start above beta_end": config_row({"diffusion.beta_start": 0.05}, "diffusion.beta_end"),
    "NaN diffusion.beta_end": config_row({"diffusion.beta_end": float("nan")}, "diffusion.beta_end"),
    "infinite train.lr": config_row({"train.lr": float("inf")}, "train.lr"),
    "sample.steps beyond the training schedule": config_row({"sample.steps": 5000}, "sample.steps"),
    "evaluate.num_samples not above its k": config_row({"evaluate.num_samples": 3}, "evaluate.num_samples"),
    "negative train.seed": config_row({"train.seed": -1}, "train.seed"),
    "negative sample.seed": config_row({"sample.seed": -5}, "sample.seed"),
    "negative data.seed": config_row({"data.seed": -1}, "data.seed"),
    "train.seed = 2**32": config_row({"train.seed": 2**32}, "train.seed"),
    # found by tests/test_fuzz.py
    "train.lr = 10**400, beyond any float": config_row({"train.lr": 10**400}, "train.lr"),
    "train.steps = 2**63, beyond TOML's integers": config_row({"train.steps": 2**63}, "train.steps"),
    "diffusion.num_train_timesteps = 2**62": config_row({"diffusion.num_train_timesteps": 2**62},
                                                        "diffusion.num_train_timesteps"),
    "class count keyed by a superscript digit": config_row({"data.class_counts": {"²": 3}}, "data.class_counts.²"),
    "finetune.pretrained of a user without a home": config_row({"finetune.pretrained": "~nosuchuser/run"},
                                                               "finetune.pretrained"),
    "output_dir with NUL": config_row({"output_dir": "a\x00b"}, "output_dir"),
    "output_dir of a user without a home": config_row({"output_dir": "~nosuchuser/run"}, "output_dir"),
    "name ../../escaped": name_row("../../escaped"),
    "empty name": name_row(""),
    "name .": name_row("."),
    "name ..": name_row(".."),
    "name with /": name_row("a/b"),
    "name with backslash": name_row("a\\b"),
    "name with a leading dot": name_row(".hidden"),
    "name with NUL": name_row("a\x00b"),
    "name with a newline": name_row("a\nb"),
    "missing config file": missing_config,
    "--set without =": set_without_equals,
    # data files
    "idx images missing": idx_images_missing,
    "idx images truncated gzip": idx_images_truncated_gzip,
    "idx labels truncated gzip": idx_labels_truncated_gzip,
    "idx images corrupt gzip": idx_corrupt_gzip,
    "idx labels gzip CRC mismatch": idx_labels_gzip_crc_mismatch,
    "idx wrong magic": idx_wrong_magic,
    "idx label count differs": idx_label_count_differs,
    "image-folder class of non-images": image_folder_non_images,
    "image-folder class of text only": image_folder_only_text,
    "image-csv ids match no image": image_csv_ids_match_no_image,
    "image-csv missing column": image_csv_missing_column,
    "image-csv gzipped csv": image_csv_gzipped,
    # run directories and outputs
    "sample a folder that is not a run": not_a_run("sample"),
    "evaluate a folder that is not a run": not_a_run("evaluate"),
    "sample a run with truncated safetensors": truncated_safetensors,
    "resume a checkpoint of another model": checkpoint_of_another_model,
    "resume with another process count": checkpoint_of_two_processes,
    "sample --steps beyond the training schedule": run_command("sample", "--steps", "5000", names=["--steps: 5000"]),
    "sample --steps 0": run_command("sample", "--steps", "0", names=["--steps"]),
    "sample --seed -5": run_command("sample", "--seed", "-5", names=["--seed"]),
    "sample --seed 2**32": run_command("sample", "--seed", str(2**32), names=["--seed"]),
    "sample --guidance nan": run_command("sample", "--class", "0", "--guidance", "nan", key="conditional",
                                         names=["--guidance"]),
    "sample --guidance inf": run_command("sample", "--class", "0", "--guidance", "inf", key="conditional",
                                         names=["--guidance"]),
    "evaluate --num-samples 1": run_command("evaluate", "--num-samples", "1", names=["num_samples 1"]),
    "attribute --top beyond the training set": run_command("attribute", "--top", "1000",
                                                           names=[("--top: 1000", "40 examples")]),
    "attribute --seed -1": run_command("attribute", "--seed", "-1", names=["--seed"]),
    "sample --num-samples abc": run_command("sample", "--num-samples", "abc", names=["--num-samples"]),
    "attribute --output bogus": run_command("attribute", "--output", "bogus", names=["--output"]),
    "sample --num-samples 2**63": run_command("sample", "--num-samples", str(2**63), names=["--num-samples"]),
    "sample --device meta": run_command("sample", "--device", "meta", names=["--device meta"]),
    "sample --device mps": run_command("sample", "--device", "mps", names=["--device mps"]),
    "sample --guidance 1e300: samples not finite": after_work(run_command(
        "sample", "--class", "0", "--guidance", "1e300", key="conditional", names=["guidance 1e+300"])),
    "demo --output in a symlink loop": demo_output_in_a_symlink_loop,
    "demo --overwrite a user's folder": demo_overwrite_user_folder,
    "train --overwrite a user's folder": train_overwrite_user_folder,
    "demo --output .": demo_output_dot(overwrite=False),
    "demo --output . --overwrite": demo_output_dot(overwrite=True),
    # what the system refuses, and damaged files in a run
    "output_dir below a regular file": output_below_a_file,
    "output_dir in a symlink loop": output_in_a_symlink_loop,
    "output_dir in a read-only folder": output_in_a_read_only_folder,
    "evaluate a run whose metrics.jsonl is random bytes": random_metrics,
    "evaluate a samples.npz of the wrong shape": damaged_samples("evaluate", wrong_shape),
    "evaluate a samples.npz holding NaN": damaged_samples("evaluate", with_nan),
    "attribute --samples-file of the wrong shape": damaged_samples("attribute", wrong_shape),
    "attribute --samples-file holding NaN": damaged_samples("attribute", with_nan),
    "resume a run whose config.toml's [model] was edited": resume_an_edited_model,
    "sample a run whose summary.json is null": damaged_file("sample", "summary.json", b"null"),
    "evaluate a run whose summary.json lacks its steps": damaged_file("evaluate", "summary.json", b"{}"),
    "evaluate a run whose control record names a class beyond the data": summary_with_control(
        {"classes": [99], "targets": [0.1], "smoothed": [0.1], "interval_95": [[0.0, 0.2]]}),
    "evaluate a run whose control record lacks its intervals": summary_with_control(
        {"classes": [2], "targets": [0.1], "smoothed": [0.1]}),
    "evaluate a run whose metrics.jsonl holds a list": damaged_file("evaluate", "metrics.jsonl", b"[]\n"),
    "resume a run whose metrics.jsonl has a record without step": damaged_file("train", "metrics.jsonl",
                                                                              b'{"lr": 0.001}\n'),
    "resume a run whose metrics.jsonl is random bytes": damaged_file("train", "metrics.jsonl", b"\xff\xfe\x00"),
    "sample a run whose model config is null": damaged_file("sample", "model/unet/config.json", b"null", ("model",)),
    "sample a run whose model_index.json is a list": damaged_file("sample", "model/model_index.json", b"[]",
                                                                  ("model",)),
    "sample a run whose scheduler config is false": damaged_file("sample", "model/scheduler/scheduler_config.json",
                                                                 b"false", ("model",)),
    "sample a run whose scheduler predicts what no sampler knows": damaged_file(
        "sample", "model/scheduler/scheduler_config.json", b'{"_class_name": "DDPMScheduler", "prediction_type": "v"}',
        ("model",)),
    "evaluate a run whose config.toml is empty": damaged_file("evaluate", "config.toml", b""),
    "evaluate a reference set within its k": edited_config("evaluate", {"evaluate.reference_samples": 1}),
    "evaluate data beyond float32": edited_config("evaluate", {"data.std": 1e308}),
}


@pytest.mark.parametrize("setup", list(ROWS.values()), ids=list(ROWS))
def test_bad_input_exits_2_with_one_line_naming_it_and_changes_nothing(setup, tmp_path, monkeypatch, capsys, request,
                                                                     snapshot):
    monkeypatch.chdir(tmp_path)
    argv, names = setup(Row(tmp_path, monkeypatch, request))
    before = snapshot(tmp_path)
    capsys.readouterr()
    code, err = run_cli(argv, capsys)
    line = check_refusal(code, err, before, snapshot(tmp_path), after_work=getattr(setup, "after_work", False))
    assert any(all(part in line for part in (name if isinstance(name, tuple) else (name,))) for name in names), \
        f"{line!r} names none of {names}"


def library_calls():
    """Bad arguments of the library's own calls, behind the command line's checks: (call on a run, what the
    ConfigError must name)."""
    from condiff.audit.results import AttributionSettings
    from condiff.lifecycle.evaluation import evaluate_run
    from condiff.lifecycle.sampling import sample_run
    return {
        "sample_run steps=5000": (lambda run: sample_run(run, steps=5000, progress=False), "^steps: 5000 inference steps"),
        "sample_run steps=0": (lambda run: sample_run(run, steps=0, progress=False), "^steps: 0 inference steps"),
        "sample_run seed=-5": (lambda run: sample_run(run, seed=-5, progress=False), "seed: "),
        "evaluate_run num_samples=3": (lambda run: evaluate_run(run, num_samples=3, progress=False), "num_samples 3"),
        "AttributionSettings seed=-1": (lambda run: AttributionSettings(seed=-1).validated(), "^seed: -1 is not allowed$"),
    }


@pytest.mark.parametrize("name", list(library_calls()))
def test_the_library_refuses_them_naming_the_argument_and_changes_nothing(name, tmp_path, monkeypatch, request,
                                                                           snapshot):
    call, named = library_calls()[name]
    run = Row(tmp_path, monkeypatch, request).copy_run()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=named) as raised:
        call(run)
    assert "--" not in str(raised.value)   # the library names arguments; only the command line speaks of flags
    assert snapshot(tmp_path) == before
