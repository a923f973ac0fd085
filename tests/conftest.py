import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("CONDIFF_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "condiff"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core (pytest -n 2): a worker's extra threads would only contend with the other's.
    torch.set_num_threads(1)


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
