"""Datasets, imbalanced subsets, samplers, and the noise-predictor presets."""

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from condiff.data.datasets import (
    EpochSampler,
    gaussian_mixture_dataset,
    load_digits_dataset,
    split_per_class,
    take_per_class,
)
from condiff.models import UNET_PRESETS, build_model, sample_shape_of


def test_digits_are_scaled_to_minus_one_one_with_ten_classes():
    digits = load_digits_dataset()
    assert digits.data.shape == (1797, 1, 8, 8)
    assert digits.data.min() == -1.0 and digits.data.max() == 1.0
    assert digits.num_classes == 10 and sorted(set(digits.labels.tolist())) == list(range(10))


def test_imbalanced_subset_has_exactly_the_requested_counts():
    pool, held = split_per_class(load_digits_dataset(), 30)
    assert held.class_counts() == [30] * 10
    counts = [140] * 10
    counts[4] = counts[5] = counts[7] = 35
    train = take_per_class(pool, counts)
    assert train.class_counts() == counts
    assert len(pool) + len(held) == 1797
    with pytest.raises(ValueError, match="class 0"):
        take_per_class(pool, [10_000] + [1] * 9)


def test_gaussian_mixture_dataset_has_the_requested_components():
    ds = gaussian_mixture_dataset([[0.0, 0.0], [5.0, 5.0]], 0.5, [300, 100], seed=1)
    assert ds.class_counts() == [300, 100]
    assert torch.allclose(ds.data[ds.labels == 1].mean(0), torch.tensor([5.0, 5.0]), atol=0.15)
    assert torch.allclose(ds.data[ds.labels == 0].std(0), torch.tensor([0.5, 0.5]), atol=0.06)


def test_epoch_sampler_visits_every_item_once_per_epoch_and_reshuffles():
    sampler, generator = EpochSampler(10), torch.Generator().manual_seed(0)
    first, second = sampler.draw(10, generator), sampler.draw(10, generator)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)  # a new order every epoch, unlike itertools.cycle
    # draws that straddle epochs still cover each epoch exactly
    stream = torch.cat([sampler.draw(7, generator) for _ in range(10)])
    assert all(sorted(stream[i:i + 10].tolist()) == list(range(10)) for i in range(0, 70, 10))


def test_epoch_sampler_state_round_trip_continues_the_same_stream():
    a, g = EpochSampler(13), torch.Generator().manual_seed(1)
    a.draw(5, g)
    state, g_state = a.state_dict(), g.get_state()
    expected = a.draw(20, g)
    b, g2 = EpochSampler(13), torch.Generator()
    b.load_state_dict(state)
    g2.set_state(g_state)
    assert torch.equal(b.draw(20, g2), expected)


@pytest.mark.parametrize("preset", sorted(UNET_PRESETS))
def test_unet_presets_run_at_their_resolution(preset):
    size = UNET_PRESETS[preset]["sample_size"]
    model = build_model(preset, (1, size, size))
    x = torch.randn(2, 1, size, size)
    assert model(x, torch.tensor([3, 900])).sample.shape == x.shape
    assert sample_shape_of(model) == (1, size, size)


@pytest.mark.parametrize("shape, widths", [((4, 4, 4), None), ((4, 14, 14), (32, 64)), ((3, 32, 32), (16, 32, 32, 64))])
def test_unet_sized_to_the_data_runs_at_any_square_size_its_levels_divide(shape, widths):
    model = build_model("unet", shape, block_out_channels=widths)
    x = torch.randn(2, *shape)
    assert model(x, torch.tensor([3, 900])).sample.shape == x.shape
    assert sample_shape_of(model) == shape
    assert tuple(model.config.block_out_channels) == (widths or (32, 64))


def test_unet_refuses_sizes_its_levels_cannot_halve():
    with pytest.raises(ValueError, match="divisible by 4, not 7"):
        build_model("unet", (4, 7, 7), block_out_channels=(32, 64, 64))
    with pytest.raises(ValueError, match="square images"):
        build_model("unet", (64,))


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="8x8"):
        build_model("unet8", (1, 28, 28))
    with pytest.raises(ValueError, match="vector"):
        build_model("mlp", (1, 8, 8))


@pytest.mark.parametrize("kind,shape", [("unet8", (1, 8, 8)), ("mlp", (2,))])
def test_saved_models_open_with_ddpm_pipeline(tmp_path, kind, shape):
    model = build_model(kind, shape)
    DDPMPipeline(unet=model, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path).unet
    x, t = torch.randn(3, *shape), torch.tensor([1, 500, 999])
    assert torch.equal(loaded(x, t).sample, model(x, t).sample)
