"""condiff deletes or replaces only what it created (issue 10, items 2 and 3): `--overwrite` replaces an
empty or condiff-marked directory and refuses a user's folder; "", ".", "/", home, the working directory
and its ancestors and condiff's checkout are never outputs; atomic writes never collide."""

import threading
from pathlib import Path

import pytest

import condiff
from condiff.cli import main
from condiff.config import ExperimentConfig
from condiff.rundir import (
    MARKER,
    PROJECT_ROOT,
    RunDirectoryError,
    check_output_directory,
    create_output_directory,
    write_text_atomic,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def users_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\section{five years of work}")
    return folder


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("condiff: error: "), lines
    return lines[0]


@pytest.mark.parametrize("command", [
    ["demo", "--steps", "1"],
    ["reproduce", "mnist-minority"],
    ["guidance-lab", "--quick", "--exact-only"],
], ids=lambda c: c[0])
def test_overwrite_refuses_a_users_folder(tmp_path, capsys, monkeypatch, command):
    """`mkdir w && echo x > w/thesis.tex && condiff demo --output w --overwrite` once deleted thesis.tex."""
    monkeypatch.chdir(tmp_path)
    folder = users_folder(tmp_path)
    before = snapshot(tmp_path)
    assert main(command + ["--output", str(folder), "--overwrite"]) == 2
    line = error_line(capsys)
    assert str(folder) in line and MARKER in line
    assert snapshot(tmp_path) == before


def test_train_and_autoencoder_overwrite_refuse_a_users_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = users_folder(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text(f'name = "c"\noutput_dir = "{folder}"\n[data]\nper_class = 20\n[train]\nsteps = 2\n')
    before = snapshot(tmp_path)
    assert main(["train", str(config), "--overwrite"]) == 2
    assert str(folder) in error_line(capsys)
    assert main(["autoencoder", str(config), "--output", str(folder), "--overwrite", "--steps", "1"]) == 2
    assert str(folder) in error_line(capsys)
    assert snapshot(tmp_path) == before


def test_a_config_built_in_python_never_empties_the_working_directory(tmp_path, monkeypatch):
    """`c = ExperimentConfig(); c.train.steps = 2; condiff.train(c, overwrite=True).path` once emptied the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("precious")
    config = ExperimentConfig()
    config.train.steps, config.train.batch_size, config.data.per_class = 2, 8, 20
    run = condiff.train(config, overwrite=True).path
    assert run == Path("runs") / config.name and (tmp_path / "runs" / config.name / "model").is_dir()
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    config.output_dir = "."
    with pytest.raises(RunDirectoryError, match="current directory"):
        condiff.train(config, overwrite=True).path
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("name", ["empty", "dot", "root", "home", "cwd", "cwd parent", "project root"])
def test_forbidden_outputs_are_refused_whatever_is_passed(tmp_path, monkeypatch, name):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = {"empty": "", "dot": ".", "root": "/", "home": str(Path.home()), "cwd": str(work),
            "cwd parent": str(tmp_path / "a"), "project root": str(PROJECT_ROOT)}[name]
    if name == "project root" and not (PROJECT_ROOT / "pyproject.toml").is_file():
        pytest.skip("condiff is installed, not run from its checkout")
    for overwrite in (False, True):
        with pytest.raises(RunDirectoryError, match="refused as an output directory"):
            check_output_directory(path, overwrite=overwrite)


def test_demo_refuses_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert main(["demo", "--output", ".", "--overwrite", "--steps", "1"]) == 2
    assert "current directory" in error_line(capsys)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_empty_and_condiff_directories_only(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (create_output_directory(empty, "test") / MARKER).is_file()
    (empty / "old-result.txt").write_text("made by condiff's earlier run")
    with pytest.raises(RunDirectoryError, match="overwrite=True"):
        create_output_directory(empty, "test")
    create_output_directory(empty, "test", overwrite=True)
    assert sorted(p.name for p in empty.iterdir()) == [MARKER]
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    (unmarked / "data.csv").write_text("1,2")
    with pytest.raises(RunDirectoryError, match="not a directory condiff created"):
        create_output_directory(unmarked, "test", overwrite=True)
    assert (unmarked / "data.csv").read_text() == "1,2"


def test_refusals_name_the_switch_as_python_and_the_command_line_spell_it(tmp_path, tiny_toml, capsys):
    """From Python a refusal says `resume=True` / `overwrite=True`, from the command line `--resume` /
    `--overwrite`; a path in braces is written as it is either way."""
    run = tmp_path / "{date}" / "run"
    config = tiny_toml(tmp_path / "c.toml", run, train={"steps": 2, "checkpoint_every": 2}, constraints=None)
    assert main(["train", config]) == 0
    with pytest.raises(RunDirectoryError) as refused:
        condiff.train(condiff.load_config(config))
    assert str(refused.value) == f"{run}: exists; pass resume=True to continue it or overwrite=True to replace it"
    capsys.readouterr()
    assert main(["train", config]) == 2
    assert error_line(capsys) == f"condiff: error: {run}: exists; pass --resume to continue it or --overwrite to " \
                                 "replace it"


def test_concurrent_atomic_writers_never_collide(tmp_path):
    """Two processes writing the same report once shared one temporary name."""
    path, errors = tmp_path / "evaluation.json", []

    def writer(text: str) -> None:
        try:
            for _ in range(200):
                write_text_atomic(path, text)
        except Exception as err:   # noqa: BLE001 - any failure is what the test looks for
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(text * 5000,)) for text in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert path.read_text() in ("a" * 5000, "b" * 5000)
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]


def test_atomic_writes_get_the_modes_a_plain_write_would(tmp_path):
    """Temporary files are private while written; what lands must be as readable as any other file."""
    import os

    from condiff.models import build_model
    from condiff.rundir import save_pretrained_atomic

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = write_text_atomic(tmp_path / "atomic.txt", "x")
    assert os.stat(atomic).st_mode == os.stat(plain).st_mode
    folder = save_pretrained_atomic(build_model("mlp", (2,), hidden=8, layers=1), tmp_path / "model")
    (tmp_path / "plain-folder").mkdir()
    assert os.stat(folder).st_mode == os.stat(tmp_path / "plain-folder").st_mode


@pytest.mark.slow
def test_the_demo_trains_its_models_side_by_side_in_worker_processes(tmp_path, tiny_config):
    """`condiff demo` trains and evaluates its two models in two worker processes: both runs are written and
    evaluated, the results come back in the configs' order, and the workers are gone after. (An error raised in a
    worker crosses back whole: test_cli.py's test_condiffs_errors_cross_from_a_worker_process_whole.)"""
    import multiprocessing

    from condiff.papers.demo import DEMO_SAMPLES, train_side_by_side

    configs = {"constrained": tiny_config(tmp_path / "constrained"),
               "unconstrained": tiny_config(tmp_path / "unconstrained", constraints=None)}
    results = train_side_by_side(configs, None, False)
    assert list(results) == ["constrained", "unconstrained"]
    for name, result in results.items():
        assert result.num_samples == DEMO_SAMPLES and (tmp_path / name / "evaluation.json").is_file()
    assert results["constrained"].multipliers and not results["unconstrained"].multipliers
    assert not multiprocessing.active_children()


def test_a_terminated_worker_leaves_once_and_not_from_inside_its_exit_handlers(monkeypatch):
    """A side-by-side worker's SIGTERM (the parent's terminate() after a failed job) raises SystemExit once; a
    worker already leaving ignores it, as it ignores a second one: raised in exit handlers, SystemExit printed a
    traceback under the parent's one-line error (seen on a failed `condiff reproduce --resume`)."""
    import multiprocessing.util
    import signal

    from condiff.runtime import leave_on_terminate

    previous = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(multiprocessing.util, "_exiting", True)
        assert leave_on_terminate(signal.SIGTERM, None) is None
        monkeypatch.setattr(multiprocessing.util, "_exiting", False)
        with pytest.raises(SystemExit):
            leave_on_terminate(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_demo_seed_offsets_both_models_training_and_sampling_seeds(tmp_path, monkeypatch):
    """`condiff demo --seed 2`: both runs train and sample with their configs' seeds + 2, on the same data, each
    in its own folder, side by side (in two worker processes) when condiff runs as one process."""
    import condiff.papers.demo as demo
    from condiff.cli import main
    from condiff.config import CONFIG_DIR, load_config

    seen = {}

    class Stop(Exception):
        pass

    def record(configs, device, progress):
        seen.update({name: (c.train.seed, c.sample.seed, c.data.seed, c.output_dir) for name, c in configs.items()})
        raise Stop

    monkeypatch.setattr(demo, "train_side_by_side", record)
    with pytest.raises(Stop):
        main(["demo", "--output", str(tmp_path / "demo"), "--seed", "2"])
    for name, file in demo.DEMO_CONFIGS.items():
        defaults = load_config(CONFIG_DIR / file)
        assert seen[name] == (defaults.train.seed + 2, defaults.sample.seed + 2, defaults.data.seed,
                              str(tmp_path / "demo" / name))
