"""Training data: scene layouts (OSCD, LEVIR-CD, pair folders), lazy patch datasets, class-balanced
sampling, paired augmentation, group splits and normalisation statistics."""

from changedet.data.augment import Geometry, PairedAugment
from changedet.data.datasets import BalancedPatchSampler, PatchDataset, PatchKey, PatchSampler, collate_patches
from changedet.data.discovery import (
    LAYOUTS,
    SceneRecord,
    discover_scenes,
    levir_scenes,
    oscd_scenes,
    pair_folder_scenes,
)
from changedet.data.scenes import IGNORE, ChangeScene, open_scenes, read_label
from changedet.data.splits import (
    Split,
    check_disjoint,
    describe_split,
    groups_of,
    leave_cities_out_folds,
    leave_groups_out_folds,
    split_by_groups,
)
from changedet.data.stats import checkpoint_normalization, compute_normalization

__all__ = [
    "IGNORE",
    "LAYOUTS",
    "BalancedPatchSampler",
    "ChangeScene",
    "Geometry",
    "PairedAugment",
    "PatchDataset",
    "PatchKey",
    "PatchSampler",
    "SceneRecord",
    "Split",
    "check_disjoint",
    "checkpoint_normalization",
    "collate_patches",
    "compute_normalization",
    "describe_split",
    "discover_scenes",
    "groups_of",
    "leave_cities_out_folds",
    "leave_groups_out_folds",
    "levir_scenes",
    "open_scenes",
    "oscd_scenes",
    "pair_folder_scenes",
    "read_label",
    "split_by_groups",
]
