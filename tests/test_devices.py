"""One device everywhere (issue 10, item 4): the chosen device, or by default the accelerator's, reaches
every model that runs (training, sampling, evaluation's classifier, the noise-aware classifier, the
autoencoder, the guidance lab), and generation gives the same samples whatever the batch size or the
split across processes.

A CPU-only machine has one real device, so the tests use PyTorch's "meta" device as the accelerator: a
global forward pre-hook records where the first model's inputs live, then stops the work (meta tensors
have no values to compute with).
"""

import pytest
import torch
from accelerate import Accelerator, PartialState
from torch.nn.modules.module import register_module_forward_pre_hook

import condiff
from condiff.config import config_from_dict
from condiff.lifecycle.evaluation import evaluate_run
from condiff.lifecycle.sampling import sample_run, train_noise_classifier_run
from condiff.lifecycle.training import train_autoencoder_for
from condiff.models import build_model
from condiff.sampling.generate import generate, sampling_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")
META = torch.device("meta")


class ReachedModel(Exception):
    pass


def first_model_input_device(work) -> torch.device:
    """Run `work()` until the first module's forward; return the device of that module's first input."""
    seen = []

    def hook(module, args):
        tensors = [a for a in args if torch.is_tensor(a)]
        if tensors:
            seen.append((type(module).__name__, tensors[0].device))
            raise ReachedModel

    handle = register_module_forward_pre_hook(hook)
    try:
        with pytest.raises(ReachedModel):
            work()
    finally:
        handle.remove()
    return seen[0][1]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    config = config_from_dict({
        "name": "devices", "output_dir": str(root / "run"),
        "data": {"dataset": "digits", "per_class": 40, "held_out_per_class": 20},
        "model": {"kind": "unet8", "block_out_channels": [8, 16]},
        "train": {"steps": 2, "batch_size": 8, "warmup_steps": 1},
        "sample": {"num_samples": 8, "batch_size": 8, "steps": 2},
        "evaluate": {"classifier_epochs": 1},
    })
    run = condiff.train(config).path
    sample_run(run, progress=False)    # evaluation finds matching samples and goes straight to its classifier
    return config, run


@pytest.fixture
def accelerator_on_meta(monkeypatch):
    """Pretend the accelerator (accelerate's choice for this process) is a device other than the CPU."""
    monkeypatch.setattr(PartialState(), "device", META)     # PartialState's attributes are shared state
    monkeypatch.setattr(Accelerator, "device", property(lambda self: META))


def test_an_explicit_device_reaches_sampling_and_evaluation(digits_run, tmp_path, monkeypatch):
    config, run = digits_run
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))    # the evaluation classifier trains, on that device
    assert first_model_input_device(lambda: sample_run(run, device="meta", progress=False)) == META
    assert first_model_input_device(lambda: evaluate_run(run, device="meta", progress=False)) == META
    assert first_model_input_device(lambda: train_noise_classifier_run(run, steps=1, device="meta",
                                                                       progress=False)) == META


def test_the_accelerators_device_is_the_default_everywhere(digits_run, tmp_path, monkeypatch, accelerator_on_meta):
    config, run = digits_run
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    config.output_dir = str(tmp_path / "train")
    works = {
        "train": lambda: condiff.train(config).path,
        "sample": lambda: sample_run(run, progress=False),
        "evaluate": lambda: evaluate_run(run, progress=False),
        "noise classifier": lambda: train_noise_classifier_run(run, steps=1, progress=False),
        "autoencoder": lambda: train_autoencoder_for(config, tmp_path / "vae", steps=1, progress=False),
        "guidance lab": lambda: learned_lab_sampling(config),
    }
    devices = {name: first_model_input_device(work) for name, work in works.items()}
    assert devices == {name: META for name in works}


def learned_lab_sampling(config):
    from condiff.lifecycle.build import build_noise_scheduler
    from condiff.labs.guidance.learned import guided_samples

    model = build_model("unet8", (1, 8, 8), block_out_channels=[8, 16], num_class_embeds=11)
    guided_samples(model, build_noise_scheduler(config, pixels=True), "ddim", torch.zeros(4, dtype=torch.long), 1.0, 2)


def test_generation_does_not_depend_on_batch_size_or_process_split():
    from condiff.lifecycle.build import build_noise_scheduler

    torch.manual_seed(0)
    model = build_model("mlp", (2,), hidden=16, layers=1)
    scheduler = build_noise_scheduler(config_from_dict({"model": {"kind": "mlp"}}), pixels=False)

    def draw(n, batch_size, first_index=0, seed=7):   # DDPM: fresh noise at every step, not only at the start
        return generate(model, sampling_scheduler(scheduler, "ddpm"), n, num_inference_steps=20, batch_size=batch_size,
                        seed=seed, first_index=first_index, progress=False, device="cpu").samples

    # The noise is the same; batched arithmetic may round differently in the last bits (and the untrained
    # network amplifies them over 20 steps).
    whole = draw(10, 10)
    torch.testing.assert_close(draw(10, 3), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([draw(4, 4), draw(6, 5, first_index=4)]), whole, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(draw(10, 10, seed=8), whole, rtol=0.1)
