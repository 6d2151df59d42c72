"""Train/validation splits by scene group (city, LEVIR tile): never by patches of one scene.

Patches of one scene overlap and are spatially autocorrelated; splitting them between training
and validation leaks the validation scene into training. Every helper here splits whole
*groups* (:attr:`SceneRecord.group`) and :func:`check_disjoint` guards the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, TypeVar

import numpy as np

from changedet.errors import InputError


class _HasGroup(Protocol):
    @property
    def group(self) -> str: ...

    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_HasGroup)


@dataclass(frozen=True)
class Split:
    """Scene names (and their groups) of one train/validation split."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    train_groups: tuple[str, ...]
    val_groups: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        """JSON-friendly form (stored in checkpoint metadata)."""
        return {
            "train": list(self.train),
            "val": list(self.val),
            "train_groups": list(self.train_groups),
            "val_groups": list(self.val_groups),
        }


def groups_of(scenes: Sequence[T]) -> list[str]:
    """Distinct groups in first-seen order."""
    return list(dict.fromkeys(s.group for s in scenes))


def check_disjoint(train: Sequence[T], val: Sequence[T]) -> None:
    """Raise :class:`InputError` when a group (or a scene name) is on both sides."""
    shared_groups = sorted({s.group for s in train} & {s.group for s in val})
    shared_names = sorted({s.name for s in train} & {s.name for s in val})
    if shared_groups or shared_names:
        raise InputError(
            "training and validation share "
            + (f"groups {', '.join(shared_groups)}" if shared_groups else f"scenes {', '.join(shared_names)}")
        )


def describe_split(train: Sequence[T], val: Sequence[T]) -> Split:
    """The :class:`Split` of two scene lists (checked disjoint)."""
    check_disjoint(train, val)
    return Split(tuple(s.name for s in train), tuple(s.name for s in val), tuple(groups_of(train)), tuple(groups_of(val)))


def split_by_groups(scenes: Sequence[T], val_groups: Sequence[str], train_groups: Sequence[str] | None = None) -> tuple[list[T], list[T]]:
    """Leave ``val_groups`` out for validation; train on ``train_groups`` (default: every other group).

    Names in ``val_groups``/``train_groups`` may be groups or scene names (a scene name selects its
    whole group). Raises :class:`InputError` for unknown names or a group on both sides.
    """
    known = {s.group for s in scenes}
    by_name = {s.name: s.group for s in scenes}

    def resolve(names: Sequence[str], what: str) -> set[str]:
        out = set()
        for n in names:
            if n in known:
                out.add(n)
            elif n in by_name:
                out.add(by_name[n])
            else:
                raise InputError(f"{what} scene/group {n!r} is not in the dataset; available: {', '.join(sorted(known))}")
        return out

    val_set = resolve(val_groups, "validation")
    train_set = resolve(train_groups, "training") if train_groups is not None else known - val_set
    overlap = sorted(train_set & val_set)
    if overlap:
        raise InputError(f"groups {', '.join(overlap)} are listed for both training and validation")
    train = [s for s in scenes if s.group in train_set]
    val = [s for s in scenes if s.group in val_set]
    check_disjoint(train, val)
    return train, val


def leave_groups_out_folds(scenes: Sequence[T], folds: int, seed: int = 0) -> list[tuple[list[T], list[T]]]:
    """K-fold cross-validation over groups (leave-cities-out): each group is validated exactly once.

    Groups are shuffled with ``seed`` and dealt round-robin into ``folds`` folds; ``folds`` equal to
    the number of groups is leave-one-city-out.
    """
    groups = groups_of(scenes)
    if not 2 <= folds <= len(groups):
        raise InputError(f"need 2 <= folds <= number of groups ({len(groups)}), got {folds}")
    order = np.random.default_rng(seed).permutation(len(groups))
    assignment = {groups[g]: i % folds for i, g in enumerate(order)}
    out = []
    for k in range(folds):
        val_groups = [g for g in groups if assignment[g] == k]
        out.append(split_by_groups(scenes, val_groups))
    return out


def leave_cities_out_folds(scenes: Sequence[T], folds: int | None = None, seed: int = 0) -> list[tuple[list[T], list[T]]]:
    """Leave-cities-out folds (:func:`leave_groups_out_folds`); ``folds=None``: one fold per city."""
    return leave_groups_out_folds(scenes, folds or len(groups_of(scenes)), seed)
