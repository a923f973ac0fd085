"""Per-example gradients from layer hooks (`condiff.attribution.per_example`) against ground truth: each
example's gradient averaged over its timesteps equals one-at-a-time autograd, the hook rules equal torch.func
on layers with strides, groups, dilation and padding indices, and a model the rules cannot cover (a layer
without a rule, weights used outside their layer) falls back to torch.func and stays exact."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condiff.attribution.features import GradientFeaturizer, noised_batches, output_value, timestep_grid
from condiff.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ALPHAS = torch.linspace(0.99, 0.01, 1000)


class Identity:
    def project(self, gradients):
        return gradients


def autograd_mean_gradient(model, output, clean, timesteps, *, seed, index, label=None):
    """Example `index`'s gradient averaged over `timesteps`, one autograd backward, under the featurizer's noise."""
    model.zero_grad()
    total = 0
    for noisy, t, noise in noised_batches(clean[None], timesteps, ALPHAS, seed=seed, first_index=index):
        labels = None if label is None else label.view(1)
        total = total + output_value(output, model(noisy, t, class_labels=labels).sample[0], noise[0]) / len(timesteps)
    total.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("output", ["dtrak", "loss"])
def test_train_features_average_each_examples_timesteps_like_autograd(output):
    """Five examples in batches of 2, 2 and 1, three timesteps each, labels, from example index 4 on."""
    torch.manual_seed(0)
    model = build_model("unet8", (1, 8, 8), block_out_channels=[8, 16], num_class_embeds=3)
    featurizer = GradientFeaturizer(model, ALPHAS, Identity(), output=output, batch_size=2)
    clean, labels, timesteps = torch.randn(5, 1, 8, 8), torch.tensor([0, 2, 1, 2, 0]), timestep_grid(3)
    features = featurizer.train_features(clean, timesteps, seed=7, first_index=4, class_labels=labels)
    assert featurizer.hooked is not None
    for i in range(5):
        expected = autograd_mean_gradient(model, output, clean[i], timesteps, seed=7, index=4 + i, label=labels[i])
        torch.testing.assert_close(features[i], expected, rtol=1e-4, atol=1e-6)


class Layers(nn.Module):
    """Every layer kind the rules cover, in the variants a rule must get right: strided, dilated and grouped
    convolutions without bias, a padding index, a Linear on (rows, positions, features) called twice, and a
    layer the output does not use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.embedding = nn.Embedding(4, 4, padding_idx=3)
        self.mix = nn.Linear(4, 4)
        self.out, self.unused = nn.Conv2d(4, 2, 1), nn.Linear(2, 2)

    def forward(self, sample, timestep, class_labels=None):
        h = self.norm(self.conv(sample)) + self.embedding(class_labels)[:, :, None, None]
        h = self.mix(F.silu(self.mix(h.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        h = h * (timestep[:, None, None, None] / 1000)
        return SimpleNamespace(sample=F.interpolate(self.out(F.silu(h)), size=sample.shape[-2:]))


@pytest.mark.parametrize("output", ["dtrak", "loss"])
@pytest.mark.parametrize("model", [Layers, lambda: build_model("mlp", (2,), hidden=8, layers=1, num_class_embeds=4)],
                         ids=["layers", "mlp"])
def test_hook_rules_equal_torch_func_with_several_rows_per_example(model, output):
    torch.manual_seed(1)
    model = model()
    featurizer = GradientFeaturizer(model, ALPHAS, Identity(), output=output)
    shape = (2, 6, 6) if isinstance(model, Layers) else (2,)
    examples, rows = 3, 4
    noisy, noise = torch.randn(examples * rows, *shape), torch.randn(examples * rows, *shape)
    steps, labels = torch.randint(0, 1000, (examples * rows,)), torch.tensor([0, 3, 1, 2, 3, 3, 0, 1, 2, 2, 1, 0])
    hooked = featurizer.mean_gradients(noisy, steps, noise, labels, rows_per_example=rows)
    assert featurizer.hooked is not None
    functional = featurizer.functional_gradients(noisy, steps, noise, labels, rows)
    torch.testing.assert_close(hooked, functional, rtol=1e-4, atol=1e-6)
    assert hooked.abs().sum() > 0


class Unruled(nn.Module):
    """A LayerNorm (no rule) and, with `reuse`, a Linear whose weight is also used outside its own forward."""

    def __init__(self, reuse: bool):
        super().__init__()
        self.reuse, self.inner, self.out = reuse, nn.Linear(2, 8), nn.Linear(8, 2)
        self.norm = nn.Identity() if reuse else nn.LayerNorm(8)

    def forward(self, sample, timestep, class_labels=None):
        h = self.norm(self.inner(sample) + (F.linear(sample, self.inner.weight) if self.reuse else 0))
        return SimpleNamespace(sample=self.out(torch.tanh(h * timestep[:, None] / 1000)))


@pytest.mark.parametrize("reuse", [False, True], ids=["layer-without-rule", "weight-used-outside-its-layer"])
def test_models_the_rules_cannot_cover_fall_back_to_torch_func(reuse):
    torch.manual_seed(2)
    model = Unruled(reuse)
    featurizer = GradientFeaturizer(model, ALPHAS, Identity(), output="loss")
    assert (featurizer.hooked is None) == (not reuse)   # a layer without a rule is known before any batch
    clean, timesteps = torch.randn(3, 2), timestep_grid(2)
    if reuse:
        with pytest.warns(RuntimeWarning, match="torch.func"):
            features = featurizer.train_features(clean, timesteps, seed=1)
        assert featurizer.hooked is None
    else:
        features = featurizer.train_features(clean, timesteps, seed=1)
    for i in range(3):
        expected = autograd_mean_gradient(model, "loss", clean[i], timesteps, seed=1, index=i)
        torch.testing.assert_close(features[i], expected, rtol=1e-4, atol=1e-6)


def test_denoising_losses_condition_on_the_labels_the_features_see():
    """A class-conditional model's measured loss is the `loss` output the features differentiate, at the same
    noise and labels (batches of 2 over 5 examples)."""
    from condiff.attribution.features import denoising_losses

    torch.manual_seed(3)
    model = build_model("mlp", (2,), hidden=16, layers=1, num_class_embeds=3)
    clean, labels, timesteps = torch.randn(5, 2), torch.tensor([0, 1, 2, 1, 0]), [100, 600]
    measured = denoising_losses(model, ALPHAS, clean, timesteps, seed=5, batch_size=2, class_labels=labels)
    direct = torch.zeros(5)
    for noisy, t, noise in noised_batches(clean, timesteps, ALPHAS, seed=5):
        with torch.no_grad():
            prediction = model(noisy, t, class_labels=labels).sample
        direct += torch.stack([output_value("loss", prediction[i], noise[i]) for i in range(5)]) / 2
    torch.testing.assert_close(measured, direct)
    other = denoising_losses(model, ALPHAS, clean, timesteps, seed=5, class_labels=(labels + 1) % 3)
    assert not torch.allclose(measured, other)


def test_an_unknown_output_function_is_refused_naming_the_argument():
    from condiff.config import ConfigError

    with pytest.raises(ConfigError, match="output='norm'"):
        GradientFeaturizer(build_model("mlp", (2,), hidden=4, layers=1), ALPHAS, Identity(), output="norm")
