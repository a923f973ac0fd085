"""Per-example gradients at the cost of about one backward pass: one forward over every row of a batch
(B examples x K rows each, example-major), one backward w.r.t. the layers' outputs only (no parameter
`.grad`), and each layer's per-example weight gradient formed from its kept input and output gradient,
the example's K rows summed inside the contraction (the rules of Opacus and BackPACK, for the layers
condiff's denoisers are made of). A model with a parametrised layer no rule covers is left to torch.func.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# A rule: (layer, its input, the gradient of its output, number of examples) -> [(parameter, (B, *shape))].
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], list[tuple[nn.Parameter, torch.Tensor]]]


def linear_gradients(layer: nn.Linear, inputs: torch.Tensor, grad_output: torch.Tensor, examples: int):
    rows_in = inputs.reshape(examples, -1, inputs.shape[-1])
    rows_out = grad_output.reshape(examples, -1, grad_output.shape[-1])
    found = [(layer.weight, torch.bmm(rows_out.transpose(1, 2), rows_in))]
    if layer.bias is not None:
        found.append((layer.bias, rows_out.sum(1)))
    return found


def conv2d_gradients(layer: nn.Conv2d, inputs: torch.Tensor, grad_output: torch.Tensor, examples: int):
    # Examples as convolution groups, an example's rows as the batch that the weight gradient sums over:
    # one grouped weight-gradient convolution, several times faster than unfold + bmm on a CPU.
    rows = len(inputs) // examples
    grouped_inputs = inputs.reshape(examples, rows, *inputs.shape[1:]).transpose(0, 1).flatten(1, 2)
    grouped_grads = grad_output.reshape(examples, rows, *grad_output.shape[1:]).transpose(0, 1).flatten(1, 2)
    shape = layer.weight.shape
    weight = torch.nn.grad.conv2d_weight(grouped_inputs, (examples * shape[0], *shape[1:]), grouped_grads,
                                         layer.stride, layer.padding, layer.dilation, layer.groups * examples)
    found = [(layer.weight, weight.view(examples, *shape))]
    if layer.bias is not None:
        found.append((layer.bias, grad_output.reshape(examples, -1, shape[0], grad_output[0, 0].numel()).sum((1, 3))))
    return found


def group_norm_gradients(layer: nn.GroupNorm, inputs: torch.Tensor, grad_output: torch.Tensor, examples: int):
    normalised = F.group_norm(inputs, layer.num_groups, eps=layer.eps)
    channels = layer.num_channels
    grads = grad_output.reshape(examples, -1, channels, grad_output[0, 0].numel())
    weight = (grads * normalised.reshape(grads.shape)).sum((1, 3))
    return [(layer.weight, weight), (layer.bias, grads.sum((1, 3)))]


def embedding_gradients(layer: nn.Embedding, inputs: torch.Tensor, grad_output: torch.Tensor, examples: int):
    rows, width = layer.num_embeddings, layer.embedding_dim
    # Each example's rows scattered into its own block of the (B * rows, width) table.
    indices = inputs.reshape(examples, -1) + rows * torch.arange(examples, device=inputs.device)[:, None]
    table = grad_output.new_zeros(examples * rows, width)
    table.index_add_(0, indices.flatten(), grad_output.reshape(-1, width))
    table = table.view(examples, rows, width)
    if layer.padding_idx is not None:
        table[:, layer.padding_idx] = 0
    return [(layer.weight, table)]


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of a layer whose per-example gradients it computes exactly (the exact class: a subclass may
    use its weights differently), or None."""
    kind = type(module)
    if kind is nn.Linear:
        return linear_gradients
    if kind is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return conv2d_gradients
    if kind is nn.GroupNorm and module.affine:
        return group_norm_gradients
    if kind is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq:
        return embedding_gradients
    return None


def parametrised_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that own parameters directly."""
    return [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]


def has_rules_for(model: nn.Module) -> bool:
    """Whether every parametrised layer of `model` has a rule."""
    return all(rule_for(layer) is not None for layer in parametrised_layers(model))


@contextlib.contextmanager
def parameters_requiring_grad(model: nn.Module) -> Iterator[None]:
    """Every parameter requires grad inside (layer outputs then carry a graph), as it was after."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


class HookedGradients:
    """(B, p) per-example gradients of `model`'s parameters (`named_parameters()` order), each example's
    rows summed, for a model every parametrised layer of which has a rule (`has_rules_for`)."""

    def __init__(self, model: nn.Module):
        self.model, self.layers = model, parametrised_layers(model)
        self.slices, offset = {}, 0
        for parameter in model.parameters():
            self.slices[parameter] = slice(offset, offset + parameter.numel())
            offset += parameter.numel()
        self.num_params = offset

    def __call__(self, value: Callable[[], torch.Tensor], examples: int) -> torch.Tensor:
        """The per-example gradients of the scalar `value()` (a sum over rows of the model's outputs), its
        rows grouped example-major into `examples` consecutive groups."""
        records = []
        handles = [layer.register_forward_hook(lambda layer, args, out: records.append((layer, args[0], out)))
                   for layer in self.layers]
        try:
            with parameters_requiring_grad(self.model):
                total = value()
        finally:
            for handle in handles:
                handle.remove()
        kept = [(layer, inputs, out) for layer, inputs, out in records if out.requires_grad]
        grads = torch.autograd.grad(total, [out for _, _, out in kept], allow_unused=True)
        parameter = next(self.model.parameters())
        # Not zero-filled: writing (B, p) twice cost 5% of a batch; what no layer writes is zeroed at the end.
        result = torch.empty(examples, self.num_params, device=parameter.device, dtype=parameter.dtype)
        written = set()
        for (layer, inputs, _), grad_output in zip(kept, grads):
            if grad_output is None:   # a layer the value does not depend on
                continue
            for owned, per_example in rule_for(layer)(layer, inputs.detach(), grad_output, examples):
                block, per_example = result[:, self.slices[owned]], per_example.reshape(examples, -1)
                if owned in written:   # a layer called more than once, or parameters shared between layers
                    block.add_(per_example)
                else:
                    block.copy_(per_example)
                    written.add(owned)
        for owned, columns in self.slices.items():
            if owned not in written:
                result[:, columns] = 0
        return result
