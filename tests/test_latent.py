"""Latent diffusion building blocks: a small AutoencoderKL trained on the digits by condiff itself."""

import json

import pytest
import torch
from diffusers import DDPMScheduler

from condiff.data import load_digits_dataset, split_per_class
from condiff.latent import (AutoencoderLoadError, build_small_autoencoder, decode_latents, encode_dataset,
                            latent_shape, load_autoencoder, save_autoencoder, train_autoencoder)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The autoencoder is tiny: extra intra-op threads only contend with other processes for the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

    from condiff.sample import generate, sampling_scheduler

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
