"""Layer-by-layer calibration, the structure GPTQ, SparseGPT and Wanda share.

The calibration windows run through the model once, up to the first decoder layer.
Then, one layer at a time: the layer runs on its inputs while hooks collect, for each
of its projections, the second moment of that projection's inputs (`H = X^T X / n`,
the Hessian of the layer's squared output error); the caller changes the layer's
weights (rounds or prunes them); the layer runs again, *with* the changes, and its
outputs become the next layer's inputs. So every layer is calibrated on what it will
actually receive once the layers before it are compressed.

Memory: the activations of the windows (two copies: the layer's inputs and outputs,
windows x seq_len x hidden floats each) and one layer's Hessians at a time
(sum of in^2 floats over the layer's projections; only the diagonals with `diagonal`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .data import windows
from .errors import UsageError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, in order: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")
    return max(lists, key=len)


def sample_windows(windows: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` of the training windows, drawn without replacement by `seed` (all of them if fewer)."""
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order[:count].sort().values]


def recipe_calibration(train_windows: torch.Tensor, recipe, train_text: torch.Tensor) -> torch.Tensor:
    """The windows a run calibrates on (one-shot methods, global-wanda): `prune.calibration_windows` of the
    training windows, drawn by the recipe's seed; with `prune.calibration_len` set, of the windows of that
    many tokens cut from `train_text` (the training text's token stream) instead."""
    length = recipe.prune.calibration_len
    if length is not None:
        train_windows = windows(train_text, length)
        if not len(train_windows):
            raise UsageError(f"prune.calibration_len is {length} tokens, but the training text has only "
                             f"{train_text.numel()}; give more text or a smaller prune.calibration_len")
    return sample_windows(train_windows, recipe.prune.calibration_windows, recipe.seed)


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first decoder layer receives for each batch of `windows`."""
    first = decoder_layers(model)[0]
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _second_moments(layer: nn.Module, inside: dict[str, nn.Module], batches: list, diagonal: bool) -> dict:
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(inside, 0)

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            moment = x.pow(2).sum(0) if diagonal else x.T @ x
            sums[name] = sums[name] + moment if name in sums else moment
            counts[name] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in inside.items()]
    try:
        for args, kwargs in batches:
            layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def _outputs(layer: nn.Module, batches: list) -> list:
    outputs = []
    for args, kwargs in batches:
        out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden}))
    return outputs


@torch.no_grad()
def layer_by_layer(model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor, batch_size: int = 4,
                   diagonal: bool = False) -> Iterator[tuple[int, int, dict[str, nn.Module], dict[str, torch.Tensor]]]:
    """Yield (index, layers, the layer's modules, their input second moments) for each decoder layer.

    Between two yields the caller may change the weights of the layer it was given; the
    layer's outputs are computed after that, with the changes. With `diagonal`, only
    the diagonal of each `X^T X / n` is kept (what Wanda needs).
    """
    was_training = model.training
    model.eval()
    try:
        layers = decoder_layers(model)
        batches = layer_inputs(model, windows, batch_size)
        for index, layer in enumerate(layers):
            inside = {n: m for n, m in modules.items() if any(m is sub for sub in layer.modules())}
            yield index, len(layers), inside, _second_moments(layer, inside, batches, diagonal)
            batches = _outputs(layer, batches)
    finally:
        model.train(was_training)
