"""Property-based fuzzing (hypothesis) of what a user hands condiff: config values, command-line flags and the
files of a run directory. Whatever they hold, a command either succeeds (exit 0, writing nothing that is not
finite) or refuses as every row of tests/test_bad_input.py does: exit 2, one line `condiff: error: ...`, no
traceback, and every file as it was.

Each property runs in two tiers: `fast` (make test-fast) and `deep` (twice the examples, marked slow; make test
runs it alone). Both draw the same examples on every run (tests/conftest.py's hypothesis profile);
`pytest --hypothesis-profile=explore` draws new ones. Examples are kept cheap: valid sizes are tiny, so that a
command that goes ahead takes well under a second; the sizes between those and the absurd ones (2**63 and up)
are left out, as a command would honestly spend minutes or gigabytes on them."""

import contextlib
import copy
import io
import json
import math
import shutil
import tempfile
import tomllib
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from condiff.cli import main
from condiff.cli.commands import parse_override
from condiff.config import ConfigError, ExperimentConfig, config_from_dict
from condiff.sampling.generate import load_samples

from conftest import check_refusal, run_cli, tiny_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py

# Examples per property are its base count times the tier's factor.
# The fast tier runs where the slow tests do not (make test-fast); where they do, the deep tier alone (conftest.py).
TIERS = [pytest.param(1, id="fast", marks=pytest.mark.fast_tier), pytest.param(2, id="deep", marks=pytest.mark.slow)]

ABSURD_INTS = [2**63, -(2**63) - 1, 2**64, 10**400, -(10**400)]   # beyond TOML's 64-bit integers
SPECIAL_NUMBERS = [0, -1, 1, 2**31, *ABSURD_INTS, math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324]
SPECIAL_TEXT = ["", "\x00", "a\x00b", "/", ".", "..", "../..", "a/b", "~", "~nobody/x", " ", "\n", "é", "\u202e",
                "nan", "-1", "--x", "1e999"]
# The special values twice: each branch is drawn about as often, and the edges are where the bugs are.
SCALARS = [st.sampled_from(SPECIAL_NUMBERS), st.sampled_from(SPECIAL_NUMBERS), st.sampled_from(SPECIAL_TEXT),
           st.integers(), st.floats(), st.text(), st.booleans(), st.dates()]


def values(scalars: list, *, leaves: int = 8):
    """One of `scalars` (mostly), or lists and tables of them (st.recursive alone draws mostly lists)."""
    nested = st.recursive(st.one_of(scalars), lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=leaves)
    return st.one_of(*scalars, nested)


TOML_VALUES = values(SCALARS)
JSON_VALUES = values([st.none(), st.booleans(), st.integers(), st.floats(), st.text()])
# Values edited into a run's own files: their integers small, or (in config.toml, which refuses them) absurd; a
# valid size in between (train.steps, model.hidden) would be honoured, for hours or gigabytes.
EDIT_SCALARS = [st.integers(-3, 8), st.floats(), st.text(), st.booleans(), st.sampled_from(SPECIAL_TEXT)]
EDIT_JSON = values([st.none(), *EDIT_SCALARS], leaves=6)
EDIT_TOML = values([st.sampled_from(ABSURD_INTS), *EDIT_SCALARS], leaves=6)
# What a user types after --set KEY=: TOML literals, bare words, unicode.
SET_TEXT = st.one_of(st.text(), st.sampled_from(SPECIAL_TEXT + [str(10**400), "[1, [2]]", "{a = 1}", "true", "'x'",
                                                                "\"a\\u0000b\"", "2020-01-01", "[", "inf", "-0.0"]))


def schema_fields() -> list[str]:
    """Every field of the config schema, dotted (`train.steps`), the sections themselves included."""
    hints = typing.get_type_hints(ExperimentConfig)
    dotted = []
    for section in fields(ExperimentConfig):
        dotted.append(section.name)
        if is_dataclass(hints[section.name]):
            dotted += [f"{section.name}.{f.name}" for f in fields(hints[section.name])]
    return dotted


FIELDS = schema_fields()


def with_value(table: dict, dotted: str, value) -> dict:
    """A copy of `table` with `dotted` set to `value`, its sections made as `--set` makes them."""
    table = copy.deepcopy(table)
    *parents, leaf = dotted.split(".")
    node = table
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return table


@contextlib.contextmanager
def workspace(tmp_path: Path):
    """A fresh working directory for one example, removed after it."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        with contextlib.chdir(folder):
            yield folder
    finally:
        shutil.rmtree(folder)


def check_outcome(argv: list[str], folder: Path, capsys, snapshot) -> None:
    """Run `argv` in `folder`: exit 0 with only finite samples written, or a refusal that changed nothing."""
    before = snapshot(folder)
    capsys.readouterr()
    code, err = run_cli(argv, capsys)
    after = snapshot(folder)
    if code == 0:
        assert "Traceback" not in err, err
        for path in [path for path in after if path.endswith(".npz") and after[path] != before.get(path)]:
            load_samples(folder / path)   # refuses samples that are not finite numbers
    else:
        check_refusal(code, err, before, after, after_work=True)   # guided samples are refused once drawn


def library_refusal(table: dict) -> str | None:
    """What config_from_dict refuses in `table` (without its source), or None; nothing else may escape it."""
    try:
        config = config_from_dict(table)
    except ConfigError as err:
        return " ".join(str(err).removeprefix("config: ").split())
    # Accepted: it is what the run's config.toml will hold, which must load again as the same config.
    assert config_from_dict(tomllib.loads(tomli_w.dumps(config.to_dict()))) == config
    return None


@pytest.mark.parametrize("tier", TIERS)
def test_config_from_dict_accepts_a_value_or_raises_config_error(tier):
    @settings(max_examples=300 * tier)
    @given(st.sampled_from(FIELDS), TOML_VALUES | st.none())
    def check(field, value):
        library_refusal(with_value(tiny_table("out"), field, value))
    check()


@pytest.mark.parametrize("tier", TIERS)
def test_train_refuses_a_config_value_in_one_line_before_it_writes(tier, tmp_path, capsys, snapshot):
    """`condiff train CONFIG` (the value in the file, or given by --set) whose output is a folder of the user's:
    refused once the config is checked, and with the library's own message when the value is what it refuses.
    (Not output_dir: a generated one would be a fresh run, trained.)"""
    @settings(max_examples=25 * tier)
    @given(st.sampled_from([f for f in FIELDS if f != "output_dir"]),
           st.one_of(st.tuples(st.just("file"), TOML_VALUES), st.tuples(st.just("set"), SET_TEXT)))
    def check(field, given_as):
        how, value = given_as
        with workspace(tmp_path) as folder:
            (folder / "mine").mkdir()
            (folder / "mine" / "notes.txt").write_text("a user's notes\n")
            config = folder / "config.toml"
            config.write_text(tomli_w.dumps(with_value(tiny_table(folder / "mine"), field, value) if how == "file"
                                            else tiny_table(folder / "mine")))
            table = tomllib.loads(config.read_text())   # as condiff reads it back: tomli_w orders a table's keys
            extra = ["--set", f"{field}={value}"] if how == "set" else []
            expected = library_refusal(with_value(table, field, parse_override(extra[1])[1]) if extra else table)
            before = snapshot(folder)
            capsys.readouterr()
            line = check_refusal(*run_cli(["train", str(config), *extra], capsys), before, snapshot(folder))
            assert expected is None or expected in line, (expected, line)
    check()


def flag(*cheap: str):
    """What a user may pass to a numeric flag: `cheap` valid values, and numbers out of range, non-finite, text."""
    return st.one_of(st.sampled_from(cheap), st.integers(max_value=0).map(str), st.integers(min_value=2**63).map(str),
                     st.floats().map(str), st.text(), st.sampled_from(SPECIAL_TEXT))


def choice(*valid: str):
    return st.one_of(st.sampled_from(valid), st.text(), st.sampled_from(SPECIAL_TEXT))


SEED = st.one_of(st.integers().map(str), st.text())
CLASS = flag("0", "1", "2")
DEVICE = choice("cpu", "cuda", "cuda:1", "meta", "mps", "cpu:0", "cpu:-1", "xla")
PATH = choice("samples.npz", "run", ".", "run/samples.npz", "missing.npz")
SWITCH = st.just(None)   # a flag without a value
FLAGS = {
    "sample": {"--num-samples": flag("1", "3"), "--method": choice("ddim", "ddpm"), "--steps": flag("1", "3"),
               "--seed": SEED, "--batch-size": flag("1", "2"), "--record-x0": SWITCH, "--class": CLASS,
               "--guidance": flag("0", "1.5"), "--guidance-kind": choice("cfg", "classifier"), "--device": DEVICE},
    "evaluate": {"--num-samples": flag("4", "8"), "--device": DEVICE},
    "attribute": {"--samples": flag("1", "2"), "--seed": SEED, "--timesteps": choice("500", "900,100", "999,0,-1", "1,a"),
                  "--top": flag("1", "2"), "--output-function": choice("dtrak", "loss"), "--train-timesteps": flag("1", "2"),
                  "--resamplings": flag("1", "2"), "--projection": choice("sparse", "gaussian"),
                  "--dimension": flag("4", "8"), "--ridge": flag("0.5", "1e-12", "1e12"), "--samples-file": PATH,
                  "--class": CLASS, "--checkpoints": flag("1", "2"), "--models": PATH,
                  "--journey-every": flag("0", "2"),
                  "--device": DEVICE, "--resume": SWITCH, "--overwrite": SWITCH},
}
# Attribute at its smallest, so that a command that goes ahead is cheap (the generated flags may override it).
CHEAP_ATTRIBUTE = ["--samples", "1", "--train-timesteps", "2", "--resamplings", "1", "--dimension", "8", "--timesteps",
                   "500", "--journey-every", "0", "--top", "1"]


def flag_lists(command: str):
    """One to three flags of `command`, each with a generated value."""
    table = FLAGS[command]
    pair = st.sampled_from(sorted(table)).flatmap(lambda name: st.tuples(st.just(name), table[name]))
    return st.lists(pair, min_size=1, max_size=3).map(
        lambda pairs: [part for name, value in pairs for part in ([name] if value is None else [name, value])])


@pytest.fixture(scope="module")
def sampled(trained, tmp_path_factory) -> dict[int | str, Path]:
    """Copies of the trained runs, each sampled (its samples.npz with x0 predictions, for attribute --samples-file)."""
    root = tmp_path_factory.mktemp("sampled")
    runs = {}
    for key in (16, "conditional"):
        runs[key] = Path(shutil.copytree(trained[key], root / f"run-{key}"))
        assert main(["sample", str(runs[key]), "--record-x0"]) == 0
    return runs


# (command, run, the flags before the generated ones, examples): a class to guide towards, attribute at its cheapest.
COMMANDS = {"sample": ("sample", 16, [], 20), "guided sample": ("sample", "conditional", ["--class", "0"], 15),
            "evaluate": ("evaluate", 16, [], 15), "attribute": ("attribute", 16, CHEAP_ATTRIBUTE, 20)}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("name", list(COMMANDS))
def test_generated_flags_go_ahead_or_are_refused_changing_nothing(name, tier, sampled, tmp_path, capsys, snapshot):
    """`condiff COMMAND RUN FIRST FLAGS` on a copy of a sampled run, with samples.npz beside it (--samples-file)."""
    command, key, first, examples = COMMANDS[name]

    @settings(max_examples=examples * tier)
    @given(flag_lists(command))
    def check(flags):
        with workspace(tmp_path) as folder:
            run = shutil.copytree(sampled[key], folder / "run")
            shutil.copy(run / "samples.npz", folder / "samples.npz")
            check_outcome([command, "run", *first, *flags], folder, capsys, snapshot)
    check()


# The files of a run that a command reads, and the commands that read them.
RUN_FILES = ["config.toml", "summary.json", "metrics.jsonl", "samples.npz", "model/unet/config.json",
             "model/model_index.json", "model/scheduler/scheduler_config.json", "checkpoints/latest"]
READERS = [["evaluate", "run"], ["sample", "run"], ["train", "run", "--resume"]]


def edited(name: str, original: bytes):
    """The file `name` of a run with one of its values replaced by a generated one (of the right syntax)."""
    if name.endswith(".npz"):
        with np.load(io.BytesIO(original)) as arrays:
            kept = dict(arrays)
        dtypes = st.sampled_from(["f4", "f8", "i1", "?", "c8", "U3"])
        array = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3))
        return st.tuples(st.sampled_from(sorted(kept)), array | st.none()).map(lambda pair: npz_bytes(kept, *pair))
    if name.endswith(".toml"):
        table = tomllib.loads(original.decode())
        return st.tuples(st.sampled_from(FIELDS), EDIT_TOML).map(
            lambda pair: tomli_w.dumps(with_value(table, *pair)).encode())
    if name.endswith(".jsonl"):
        lines = original.decode().splitlines()
        return st.tuples(st.integers(0, len(lines) - 1), EDIT_JSON).map(
            lambda pair: "\n".join(lines[:pair[0]] + [json.dumps(pair[1])] + lines[pair[0] + 1:]).encode() + b"\n")
    if name.endswith(".json"):
        values = json.loads(original)
        return st.tuples(st.sampled_from(sorted(values)), EDIT_JSON).map(
            lambda pair: json.dumps({**values, pair[0]: pair[1]}).encode())
    return st.text().map(str.encode)


def npz_bytes(arrays: dict, name: str, array) -> bytes:
    """An .npz of `arrays` with `name` replaced by `array` (left out when None)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{key: value for key, value in arrays.items() if key != name},
             **({} if array is None else {name: array}))
    return buffer.getvalue()


def damaged(name: str, original: bytes):
    """Random bytes, the original truncated, an empty file, JSON of any shape, or one value edited."""
    return st.one_of(st.binary(max_size=64), st.integers(0, max(len(original) - 1, 0)).map(lambda n: original[:n]),
                     st.just(b""), JSON_VALUES.map(lambda value: json.dumps(value).encode()), edited(name, original))


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("name", RUN_FILES)
def test_a_damaged_run_file_is_read_or_refused_changing_nothing(name, tier, sampled, tmp_path, capsys, snapshot):
    original = (sampled[16] / name).read_bytes()

    @settings(max_examples=8 * tier)
    @given(damaged(name, original), st.sampled_from(READERS))
    def check(content, argv):
        with workspace(tmp_path) as folder:
            run = shutil.copytree(sampled[16], folder / "run")
            (run / name).write_bytes(content)
            check_outcome(argv, folder, capsys, snapshot)
    check()
