"""Latent diffusion building blocks: a small AutoencoderKL trained on the digits by condiff itself."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import condiff
from condiff.data.datasets import load_digits_dataset, split_per_class
from condiff.data.latent import (
    AutoencoderLoadError,
    build_small_autoencoder,
    decode_latents,
    encode_dataset,
    latent_shape,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]   # trains autoencoders and a latent run


@pytest.fixture(scope="module")
def digits():
    return split_per_class(load_digits_dataset(), held_out_per_class=20, seed=0)


@pytest.fixture(scope="module")
def vae(digits):
    pool, _ = digits
    return train_autoencoder(pool, steps=300, batch_size=64, lr=2e-3, kl_weight=1e-4, seed=0, progress=False)


def test_reconstruction_error_is_far_below_the_data_variance(vae, digits):
    _, held = digits
    with torch.no_grad():
        reconstruction = vae(held.data).sample.clamp(-1, 1)
    mse = torch.mean((reconstruction - held.data) ** 2).item()
    variance = held.data.var().item()  # the MSE of predicting every pixel by the mean (~0.56)
    assert mse < variance / 10, (mse, variance)  # measured ~0.024


def test_scaled_latents_have_unit_variance(vae, digits):
    pool, held = digits
    assert vae.config.scaling_factor != 1.0
    train_latents, held_latents = encode_dataset(vae, pool), encode_dataset(vae, held)
    assert train_latents.sample_shape == latent_shape(vae, pool.sample_shape) == (4, 4, 4)
    assert abs(train_latents.data.std().item() - 1.0) < 0.1
    assert abs(held_latents.data.std().item() - 1.0) < 0.1
    assert torch.equal(train_latents.labels, pool.labels)
    assert train_latents.num_classes == pool.num_classes
    assert train_latents.name == f"{pool.name}-latent"


def test_encode_then_decode_is_the_forward_pass_through_the_posterior_mean(vae, digits):
    _, held = digits
    batch = held.subset(torch.arange(37))
    with torch.no_grad():
        forward = vae(batch.data).sample.clamp(-1, 1)
    # Batches smaller than the set: the result must not depend on how it is split.
    decoded = decode_latents(vae, encode_dataset(vae, batch, batch_size=16).data, batch_size=10)
    assert decoded.shape == batch.data.shape
    torch.testing.assert_close(decoded, forward, atol=1e-5, rtol=1e-5)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_save_and_load_round_trip(vae, digits, tmp_path):
    _, held = digits
    path = tmp_path / "vae"
    save_autoencoder(build_small_autoencoder((1, 8, 8)), path)  # replaced atomically below
    save_autoencoder(vae, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no temporary folders left
    assert (path / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["scaling_factor"] == vae.config.scaling_factor
    loaded = load_autoencoder(path)
    assert loaded.config.scaling_factor == vae.config.scaling_factor
    latents = encode_dataset(vae, held).data
    assert torch.equal(encode_dataset(loaded, held).data, latents)
    assert torch.equal(decode_latents(loaded, latents), decode_latents(vae, latents))


def test_load_errors_are_one_line_and_name_the_path(tmp_path):
    missing = tmp_path / "no-such-vae"
    with pytest.raises(AutoencoderLoadError, match="no-such-vae") as error:
        load_autoencoder(missing)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)

    not_a_vae = tmp_path / "unet"
    not_a_vae.mkdir()
    (not_a_vae / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(AutoencoderLoadError, match="UNet2DModel"):
        load_autoencoder(not_a_vae)

    no_weights = tmp_path / "no-weights"
    save_autoencoder(build_small_autoencoder((1, 8, 8)), no_weights)
    (no_weights / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(AutoencoderLoadError, match="no-weights") as error:
        load_autoencoder(no_weights)
    assert "\n" not in str(error.value)


def test_training_is_deterministic_and_leaves_the_global_rng_alone(digits):
    pool, _ = digits
    small = pool.subset(torch.arange(64))
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = train_autoencoder(small, steps=3, batch_size=16, seed=5, progress=False, block_out_channels=(8, 16))
    assert torch.equal(torch.rand(1), expected)
    b = train_autoencoder(small, steps=3, batch_size=16, seed=5, progress=False, block_out_channels=(8, 16))
    c = train_autoencoder(small, steps=3, batch_size=16, seed=6, progress=False, block_out_channels=(8, 16))
    assert a.config.scaling_factor == b.config.scaling_factor
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("shape, blocks, latent", [((1, 8, 8), (16, 32), (4, 4, 4)),
                                                   ((1, 28, 28), (8, 16), (4, 14, 14)),
                                                   ((1, 28, 28), (8, 16, 16), (4, 7, 7)),
                                                   ((3, 32, 32), (8, 16, 32), (4, 8, 8))])
def test_small_autoencoder_shapes(shape, blocks, latent):
    vae = build_small_autoencoder(shape, block_out_channels=blocks)
    assert latent_shape(vae, shape) == latent
    with torch.no_grad():
        posterior = vae.encode(torch.zeros(2, *shape)).latent_dist
        assert tuple(posterior.mean.shape[1:]) == latent
        assert tuple(vae.decode(posterior.mean).sample.shape[1:]) == shape


def test_small_autoencoder_rejects_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="does not divide"):
        build_small_autoencoder((1, 28, 28), block_out_channels=(8, 16, 16, 16))
    with pytest.raises(ValueError, match="images"):
        build_small_autoencoder((64,))


def test_sampling_in_latent_space_decodes_to_images(vae, digits):
    """The whole sampling path on 4x4x4 latents: condiff's sampler on a UNet sized for 4x4 (the
    unet8 preset's widths with sample_size 4: 4x4 -> 2x2), then decode. Untrained, so only shapes
    and ranges are checked; latents have unit variance, so the sampler must not clip them to [-1, 1]."""
    from diffusers import UNet2DModel

    from condiff.sampling.generate import generate, sampling_scheduler

    pool, _ = digits
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2)
    scheduler = sampling_scheduler(DDPMScheduler(num_train_timesteps=1000, clip_sample=False), "ddim")
    latents = generate(unet, scheduler, 6, num_inference_steps=2, progress=False).samples
    assert latents.shape == (6, *latent_shape(vae, pool.sample_shape))
    images = decode_latents(vae, latents)
    assert images.shape == (6, *pool.sample_shape) and images.abs().max() <= 1


# Latent diffusion runs: [latent] autoencoder = PATH in a config

@pytest.fixture(scope="module")
def saved_vae(vae, tmp_path_factory):
    return save_autoencoder(vae, tmp_path_factory.mktemp("latent") / "vae")


def latent_config(tmp_path, autoencoder, **sections):
    """A latent config, validated and its autoencoder checked (as `load_config` does)."""
    from condiff.config import config_from_dict
    from condiff.lifecycle.build import check_inputs

    table = {
        "name": "latent", "output_dir": str(tmp_path / "run"),
        "data": {"dataset": "digits", "per_class": 100, "held_out_per_class": 30, "class_counts": {"4": 25}},
        "latent": {"autoencoder": str(autoencoder)},
        "model": {"kind": "unet", "block_out_channels": [32, 64]},
        "train": {"steps": 400, "batch_size": 64, "lr": 2e-3, "warmup_steps": 40, "checkpoint_every": 400},
        "constraints": {"classes": [4], "gamma": 1.0},
        "dual": {"estimator": "mixture", "batch_size": 16, "lr": 1.0, "lr_relative": False},
        "sample": {"steps": 20, "num_samples": 400, "batch_size": 400},
        "evaluate": {"classifier_epochs": 10},
        **sections,
    }
    config = config_from_dict(table)
    check_inputs(config)
    return config


def test_latent_run_trains_on_latents_and_samples_decoded_images(saved_vae, vae, tmp_path):
    """A constrained run in the 4x4x4 latent space: the saved pipeline denoises latents (no clipping:
    they have unit variance), samples come back as 8x8 images beside their latents, and the decoded
    samples are far closer to the digits (FD of the pixel-space classifier) than decoded prior noise."""
    from diffusers import DDPMPipeline

    from condiff.evaluation.classifier import extract_features
    from condiff.evaluation.metrics import frechet_distance
    from condiff.lifecycle.build import build_data
    from condiff.lifecycle.build import evaluation_classifier
    from condiff.lifecycle.evaluation import evaluate_run

    config = latent_config(tmp_path, saved_vae)
    run = condiff.train(config).path
    pipeline = DDPMPipeline.from_pretrained(run / "model")
    assert pipeline.unet.config.sample_size == 4 and pipeline.unet.config.in_channels == 4
    assert pipeline.scheduler.config.clip_sample is False
    multipliers = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["multipliers"]
    assert multipliers["class 4"] > 0

    result = evaluate_run(run, progress=False)
    saved = np.load(run / "samples.npz")
    assert saved["samples"].shape == (400, 1, 8, 8) and np.abs(saved["samples"]).max() <= 1
    assert saved["latents"].shape == (400, 4, 4, 4)
    torch.testing.assert_close(decode_latents(vae, torch.from_numpy(saved["latents"][:20])),
                               torch.from_numpy(saved["samples"][:20]))

    data = build_data(config)
    classifier, _ = evaluation_classifier(config, data)
    reference = extract_features(classifier, data.reference.data)
    prior = decode_latents(vae, torch.randn(400, 4, 4, 4, generator=torch.Generator().manual_seed(0)))
    prior_fd = frechet_distance(extract_features(classifier, prior), reference)
    assert result.frechet_distance < 0.5 * prior_fd, (result.frechet_distance, prior_fd)


def test_latent_config_errors_name_the_field(saved_vae, tmp_path):
    from condiff.config import ConfigError

    with pytest.raises(ConfigError, match=r"latent\.autoencoder: .*missing-vae.*not found.*condiff autoencoder"):
        latent_config(tmp_path, tmp_path / "missing-vae")
    with pytest.raises(ConfigError, match=r"latent\.autoencoder: empty path"):
        latent_config(tmp_path, " ")
    rgb = save_autoencoder(build_small_autoencoder((3, 8, 8)), tmp_path / "rgb-vae")
    with pytest.raises(ConfigError, match=r"latent\.autoencoder: it takes 3-channel images, the digits data have 1"):
        latent_config(tmp_path, rgb)
    unet_folder = tmp_path / "unet"
    unet_folder.mkdir()
    (unet_folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ConfigError, match=r"latent\.autoencoder: .*'UNet2DModel', not an AutoencoderKL"):
        latent_config(tmp_path, unet_folder)
    with pytest.raises(ConfigError, match=r"latent\.autoencoder: latent diffusion needs images"):
        latent_config(tmp_path, saved_vae, data={"dataset": "gmm", "means": [[0.0], [1.0]], "per_class": 5},
                      constraints={})


def test_a_unet_preset_that_does_not_fit_the_latents_is_refused_before_anything_is_written(saved_vae, tmp_path):
    from condiff.config import ConfigError

    config = latent_config(tmp_path, saved_vae, model={"kind": "unet8"})
    with pytest.raises(ConfigError, match=r"model\.kind: unet8 expects images of 8x8, not samples of shape \(4, 4, 4\)"):
        condiff.train(config).path
    assert not (tmp_path / "run").exists()


def test_autoencoder_command_trains_into_the_folder_the_config_names(tmp_path, monkeypatch, capsys):
    from condiff.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "latent.toml").write_text('name = "x"\n[data]\nper_class = 40\n[latent]\nautoencoder = "ae"\n')
    args = ["autoencoder", "latent.toml", "--steps", "2", "--block-out-channels", "8", "16"]
    assert main(args) == 0
    loaded = load_autoencoder(tmp_path / "ae")
    assert tuple(loaded.config.block_out_channels) == (8, 16) and loaded.config.in_channels == 1
    before = (tmp_path / "ae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert main(args) == 2 and "ae: exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "ae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    assert main(args + ["--overwrite"]) == 0
    assert main(["autoencoder", "latent.toml", "--block-out-channels", "8", "0"]) == 2
    assert "--block-out-channels: must be positive" in capsys.readouterr().err
    five_levels = ["--block-out-channels", "8", "8", "8", "8", "8"]   # 8x8 halved four times
    assert main(["autoencoder", "latent.toml", "--output", "odd", "--steps", "2", *five_levels]) == 2
    assert "does not divide the image size 8" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()
