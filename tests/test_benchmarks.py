"""The sampling options benchmarks/throughput.py times keep generate's samples (channels_last: the same;
bf16 autocast: close), `condiff sample` takes them from the run's config, a training precision the device
cannot autocast is reported, and the benchmark itself runs end to end on the CPU."""

import contextlib
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import condiff.lifecycle.sampling as sampling
import condiff
from condiff.config import TrainConfig, config_from_dict
from condiff.lifecycle.build import load_pipeline
from condiff.sampling.generate import generate, load_samples, network_precision, sampling_scheduler
from condiff.training.loop import make_accelerator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small digits UNet, trained a little (1-2 s): an untrained network's DDIM path amplifies any rounding
    difference, a trained one's does not. Its config samples in bf16 and channels_last."""
    return condiff.train(config_from_dict({
        "name": "unet", "output_dir": str(tmp_path_factory.mktemp("throughput") / "run"),
        "data": {"dataset": "digits", "per_class": 30}, "model": {"kind": "unet8", "block_out_channels": [16, 32]},
        "train": {"steps": 60, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 60},
        "sample": {"num_samples": 12, "batch_size": 8, "steps": 10, "seed": 1, "mixed_precision": "bf16",
                   "channels_last": True}})).path


def draw(run, **options) -> torch.Tensor:
    """DDIM samples of a fresh copy of the run's UNet (channels_last converts the model it is given)."""
    pipeline = load_pipeline(run)
    return generate(pipeline.unet, sampling_scheduler(pipeline.scheduler, "ddim"), 12, num_inference_steps=10,
                    batch_size=8, seed=1, progress=False, **options).samples


def test_channels_last_gives_the_same_samples(run):
    default, nhwc = draw(run), draw(run, channels_last=True)
    assert nhwc.is_contiguous()
    assert not default.is_inference()   # drawn under inference_mode, but callers modify samples in place
    torch.testing.assert_close(nhwc, default, rtol=0, atol=1e-5)


def test_bf16_autocast_runs_on_the_cpu_and_gives_close_samples(run):
    default, bf16 = draw(run), draw(run, mixed_precision="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, default)   # autocast really ran
    assert (bf16 - default).abs().max() < 0.1   # images in [-1, 1]; measured 0.02


def test_full_precision_adds_nothing_and_unknown_precisions_are_refused():
    assert isinstance(network_precision(torch.device("cpu"), "no"), contextlib.nullcontext)
    with pytest.raises(ValueError, match="fp8"):
        network_precision(torch.device("cpu"), "fp8")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_training_precision_the_device_cannot_autocast_is_reported(precision):
    AcceleratorState._reset_state()   # an Accelerator's mixed precision is fixed per process otherwise
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            accelerator = make_accelerator(TrainConfig(mixed_precision=precision))
        reported = [str(w.message) for w in caught if "trains in float32" in str(w.message)]
        assert bool(reported) == (not accelerator.native_amp)   # on a CPU: fp16 reported, bf16 autocast
        if accelerator.device.type == "cpu":
            assert accelerator.native_amp == (precision == "bf16")
    finally:
        AcceleratorState._reset_state()


def test_sample_run_takes_precision_and_memory_format_from_the_run_config(run, monkeypatch):
    passed, real = {}, sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *args, **kwargs: passed.update(kwargs) or real(*args, **kwargs))
    samples, provenance = load_samples(sampling.sample_run(run, progress=False))
    assert passed["mixed_precision"] == "bf16" and passed["channels_last"] is True
    assert provenance["mixed_precision"] == "bf16"   # recorded: these are not the full-precision samples
    assert torch.equal(torch.from_numpy(samples), draw(run, mixed_precision="bf16", channels_last=True))


@pytest.mark.slow
def test_throughput_benchmark_times_every_option_and_two_cpu_processes(tmp_path, capsys):
    """One reduced run of the benchmark (in this process; its torchrun part starts its own): a time for every
    training and sampling row (fp16 training skipped on a CPU with its reason: accelerate does not autocast it
    there) and one per rank of the two-process run."""
    spec = importlib.util.spec_from_file_location("throughput", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    try:
        benchmark.main(["--size", "reduced", "--rounds", "1", "--threads", "1", "--steps", "5", "--sample-steps", "2",
                        "--precisions", "no", "fp16", "bf16", "--json", str(tmp_path / "raw.json")])
    finally:
        AcceleratorState._reset_state()
    out = capsys.readouterr().out
    assert "failed" not in out and "accelerate does not autocast fp16 on cpu" in out, out[-3000:]
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert len(raw["train"]) == 6 and len(raw["sample"]) == 5
    assert all(t > 0 for times in [*raw["train"].values(), *raw["sample"].values()] for t in times)
    assert sorted(raw["processes"]) == ["1", "2"] and [r["rank"] for r in raw["processes"]["2"]["ranks"]] == [0, 1]


@pytest.mark.parametrize("script", sorted(BENCHMARK.parent.glob("*.py")), ids=lambda p: p.name)
def test_every_benchmark_compiles_under_this_python(script):
    """Benchmarks run only by hand: at least they must parse on the Python the project supports (an f-string
    nesting quotes, valid only from 3.12, once slipped in)."""
    compile(script.read_text(), str(script), "exec")
