"""Structured channel pruning: the filters of smallest L1 norm removed from every convolution.

Li et al., *Pruning Filters for Efficient ConvNets* (ICLR 2017), as Siamese change detection's edge
literature applies it: every convolution keeps the same share of its output filters, chosen by the
L1 norm of their weights; BatchNorm statistics, the next layer's input channels, the weight-shared
encoder's skips and the decoder's concatenations follow (torch-pruning's dependency graph does that
bookkeeping). The change head keeps its one output.

The FC family's widths are all multiples of one ``base_channels``, so pruning every convolution by
``1 - keep/base`` gives the architecture of ``base_channels=keep`` exactly: a pruned checkpoint is an
ordinary registry checkpoint (it exports, quantises and runs in every runtime). Models whose widths
are not one parameter are refused. A pruned model needs a short fine-tune (``changedet train
--init-weights``) before it is used.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from changedet.errors import ModelError
from changedet.models.base import ChangeModel
from changedet.models.registry import create_model, model_entry
from changedet.models.test_time import Ensemble

WIDTH = "base_channels"  # the one builder argument that sets every width of a prunable model


def _base_width(name: str, config: dict[str, Any]) -> int:
    builder = model_entry(name).builder
    parameter = inspect.signature(builder).parameters.get(WIDTH)
    if parameter is None:
        raise ModelError(f"{name} cannot be pruned: only models whose widths are set by one {WIDTH} "
                         "(fc-ef, fc-siam-conc, fc-siam-diff, and ensembles of them)")  # fmt: skip
    return int(config.get(WIDTH, parameter.default))


def pruned_config(name: str, config: dict[str, Any], keep: float) -> dict[str, Any]:
    """The builder config of ``name`` (``config``) with ``keep`` of its filters (0 < keep < 1); ensembles member by member."""
    if name == "ensemble":
        return {**config, "members": [{**m, "config": pruned_config(m["model"], m.get("config", {}), keep)}
                                      for m in config["members"]]}  # fmt: skip
    base = _base_width(name, config)
    kept = round(base * keep)
    if not 1 <= kept < base:
        raise ModelError(f"keeping {keep:g} of {base} base channels leaves {kept}: give a share that keeps 1 to {base - 1}")
    return {**config, WIDTH: kept}


def _prune_one(model: ChangeModel, name: str, config: dict[str, Any], in_channels: tuple[int, int], keep: float) -> ChangeModel:
    import torch_pruning as tp

    small = pruned_config(name, config, keep)
    target = create_model(name, in_channels=list(in_channels), **small)
    ratio = 1 - small[WIDTH] / _base_width(name, config)
    side = max(16, model.min_input_size)
    example = tuple(torch.zeros(1, c, side, side) for c in in_channels)
    model = model.eval()
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs=example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=[model.head], output_transform=lambda out: out.logits.sum(),
    )  # fmt: skip
    pruner.step()
    try:
        target.load_state_dict(model.state_dict())
    except RuntimeError as exc:
        raise ModelError(f"pruning {name} did not give the widths of {WIDTH}={small[WIDTH]}: {exc}") from None
    return target.eval()


def prune_model(model: ChangeModel, name: str, config: dict[str, Any], in_channels: tuple[int, int], keep: float) -> ChangeModel:
    """``model`` (registry ``name`` built with ``config``) with ``keep`` of every convolution's filters,
    those of largest L1 norm, as the registry model of :func:`pruned_config` (``model`` is consumed)."""
    if name == "ensemble":
        return Ensemble([_prune_one(m, spec["model"], spec.get("config", {}), in_channels, keep)
                         for m, spec in zip(model.members, config["members"])]).eval()  # fmt: skip
    return _prune_one(model, name, config, in_channels, keep)
