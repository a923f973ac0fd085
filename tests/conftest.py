import copy
import os
import re
import warnings
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import settings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("CONDIFF_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "condiff"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core (pytest -n 2): a worker's extra threads would only contend with the other's.
    torch.set_num_threads(1)

# Property tests (tests/test_fuzz.py) set their own example counts. Derandomized: the same examples on every run
# and machine, so that a failure in CI reproduces; no example database, so that nothing is written into the checkout.
# A hunt for new examples: pytest --hypothesis-profile=explore.
settings.register_profile("condiff", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", settings.get_profile("condiff"), derandomize=False)
settings.load_profile("condiff")


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first: `make test`'s two workers take whole files in this order, so the run ends on
    short files, not with one worker idle while the other trains (collection order otherwise). And a run that
    includes the slow tests draws every property test's deep tier (twice the examples of its fast tier, marked
    slow): its fast tier would only repeat a part of that work (kept where the run leaves out the slow tests or
    asks for it with -k fast)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)   # stable: each file's tests keep their order
    if "not slow" in (config.getoption("markexpr") or "") or "fast" in (config.getoption("keyword") or ""):
        return
    repeated = [item for item in items if item.get_closest_marker("fast_tier")]
    if repeated:
        config.hook.pytest_deselected(items=repeated)
        items[:] = [item for item in items if not item.get_closest_marker("fast_tier")]


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): extra
    intra-op threads only contend with other processes for the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tiny constrained run most tests train: three 2-D Gaussian components, component 2 under-represented
# and constrained (resilient), an MLP of one block. Trains in well under a second.
TINY_RUN = {
    "name": "tiny",
    "data": {"dataset": "gmm", "means": [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], "std": 0.2, "per_class": 40,
             "class_counts": {"2": 10}},
    "model": {"kind": "mlp", "hidden": 32, "layers": 1},
    "train": {"steps": 40, "batch_size": 16, "lr": 1e-3, "warmup_steps": 5, "checkpoint_every": 10,
              "ema_decay": 0.9},
    "constraints": {"classes": [2], "gamma": 0.3},
    "dual": {"batch_size": 8, "primal_steps_per_dual": 3, "lr": 1.0, "lr_relative": False},
    "sample": {"num_samples": 40, "batch_size": 40, "steps": 4},
}


def tiny_table(output_dir, **sections) -> dict:
    """TINY_RUN writing to `output_dir`, each keyword a section whose keys replace the tiny run's
    (`train={"steps": 20}`, a key given as None is dropped); a section given as None is dropped
    (`constraints=None`: unconstrained)."""
    table = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY_RUN.items()}
    table["output_dir"] = str(output_dir)
    for name, values in sections.items():
        if values is None:
            table.pop(name, None)
        elif isinstance(values, dict):
            table[name] = {k: v for k, v in {**table.get(name, {}), **values}.items() if v is not None}
        else:
            table[name] = values
    return table


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(output_dir, **sections)`: the validated ExperimentConfig of `tiny_table`."""
    from condiff.config import config_from_dict

    return lambda output_dir, **sections: config_from_dict(tiny_table(output_dir, **sections))


@pytest.fixture(scope="session")
def tiny_toml():
    """`tiny_toml(path, output_dir, **sections)`: `tiny_table` written to the TOML file `path`; its path."""
    import tomli_w

    def write(path, output_dir, **sections) -> str:
        path.write_text(tomli_w.dumps(tiny_table(output_dir, **sections)))
        return str(path)
    return write


@pytest.fixture(scope="session")
def snapshot():
    """`snapshot(root)`: {relative path: bytes} of every file under root (None for a folder), to show that a
    refused or interrupted command changed nothing."""
    def take(root) -> dict:
        return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}
    return take


@pytest.fixture
def drawn(monkeypatch):
    """The figures condiff saves, in order: what they show is read back from their artists."""
    import sys

    import condiff.report as report

    figures, save = [], report.save_figure

    def recording_save(figure, path):
        figures.append(figure)
        return save(figure, path)

    for module in list(sys.modules.values()):   # every module that imported save_figure by name
        if getattr(module, "save_figure", None) is save and module.__name__.startswith("condiff"):
            monkeypatch.setattr(module, "save_figure", recording_save)
    return figures


# The smallest run the command-line tests train (tests/test_bad_input.py, tests/test_fuzz.py): two 2-D Gaussian
# components of 20 points, an MLP of width 16, 4 steps, checkpoints at steps 2 and 4; 8 samples of 2 steps.
TINY = {
    "name": "tiny",
    "data": {"dataset": "gmm", "means": [[-1.0, 0.0], [1.0, 0.0]], "std": 0.2, "per_class": 20},
    "model": {"kind": "mlp", "hidden": 16, "layers": 1},
    "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2},
    "sample": {"num_samples": 8, "batch_size": 8, "steps": 2},
}


def tiny_config_file(path: Path, output_dir: Path, changes: dict | None = None) -> str:
    """Write TINY with output_dir and dotted `changes` ({"train.steps": 0}; a section name replaces
    the whole section) to `path`; returns its path."""
    table = copy.deepcopy(TINY) | {"output_dir": str(output_dir)}
    for dotted, value in (changes or {}).items():
        *parents, leaf = dotted.split(".")
        node = table
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(tomli_w.dumps(table))
    return str(path)


# The tiny runs that command-line tests copy, by key: two widths, and a class-conditional one (for guidance).
TRAINED = {16: {"model.hidden": 16}, 32: {"model.hidden": 32},
           "conditional": {"model.class_conditional": True, "train.label_dropout": 0.2}}


@pytest.fixture(scope="module")
def trained(one_torch_thread, tmp_path_factory) -> dict[int | str, Path]:
    """The TRAINED runs of TINY, {key: run directory}, checkpoints at steps 2 and 4. Copy one before a
    command writes into it."""
    from condiff.cli import main

    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for key, changes in TRAINED.items():
        runs[key] = root / f"run-{key}"
        assert main(["train", tiny_config_file(root / f"run-{key}.toml", runs[key], changes)]) == 0
    return runs


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv)'s exit code and its stderr as a user would see it, with the warnings Python shows."""
    from condiff.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=hidden)   # hidden by default outside __main__
        try:
            code = main(argv)
        except SystemExit as exit:   # argparse's --help
            code = exit.code
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return code, capsys.readouterr().err + shown


# tqdm's bars, a line each redraw ('\r'), and the blank line before the first.
PROGRESS_BAR = re.compile(r"\s*|(?!condiff:)[^|]*\d+%\|.*")


def check_refusal(code: int, err: str, before: dict, after: dict, *, after_work: bool = False) -> str:
    """A refusal: exit 2, one line `condiff: error: ...` (no traceback, no usage), and the `snapshot`s taken
    before and after the command equal (nothing added, removed or changed). Returns the line. `after_work`: a
    refusal of what the work made (samples that are not finite), after the progress bars of that work."""
    lines = [line for line in err.splitlines() if not (after_work and PROGRESS_BAR.fullmatch(line))]
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("condiff: error: ") and lines[0].strip() != "condiff: error:", \
        f"expected one line `condiff: error: ...`, got {err!r}"
    assert after == before, {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                             "changed": sorted(p for p in set(before) & set(after) if before[p] != after[p])}
    return lines[0]
