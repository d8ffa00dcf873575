"""Structure names: parse ``"blockdiagonal:32"``-style names into a :class:`StructureSpec`.

Accepted forms (``FAMILY`` from :data:`FAMILIES`):

- ``"FAMILY"``: the family with its default sizes (those of the reference package);
- ``"FAMILY:N"`` or ``"FAMILY:N,M"``: with sizes (``blockdiagonal:B``,
  ``hierarchical:K1,K2``, ``triltopleftdiag:k`` and the other triangular corners);
- the reference's names with sizes baked in: ``"blockBdiagonal"`` (``"block30diagonal"``)
  and ``"hierarchicalK1_K2"`` (``"hierarchical15_15"``).

Adding a family is one module and one :func:`register_structure` call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from torchsingd.structures.base import StructuredMatrix


@dataclass(frozen=True)
class _Family:
    cls: type[StructuredMatrix]
    defaults: tuple[int, ...]
    option_names: tuple[str, ...]
    memory: str


FAMILIES: dict[str, _Family] = {}


def register_structure(
    cls: type[StructuredMatrix],
    defaults: tuple[int, ...] = (),
    option_names: tuple[str, ...] = (),
    memory: str = "",
) -> None:
    """Make ``cls`` available under ``cls.family`` (with size parameters ``defaults``)."""
    if len(defaults) != len(option_names):
        raise ValueError("Give one name per size parameter.")
    FAMILIES[cls.family] = _Family(cls, tuple(defaults), tuple(option_names), memory)


@dataclass(frozen=True)
class StructureSpec:
    """A structure family with its sizes fixed: builds members of any dimension."""

    cls: type[StructuredMatrix]
    options: tuple[int, ...]

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``"blockdiagonal:30"``."""
        if not self.options:
            return self.cls.family
        return f"{self.cls.family}:{','.join(str(o) for o in self.options)}"

    def eye(self, dim: int, dtype: torch.dtype | None = None, device=None) -> StructuredMatrix:
        return self.cls.eye(dim, *self.options, dtype=dtype, device=device)

    def zeros(self, dim: int, dtype: torch.dtype | None = None, device=None) -> StructuredMatrix:
        return self.cls.zeros(dim, *self.options, dtype=dtype, device=device)

    def from_dense(self, M: Tensor) -> StructuredMatrix:
        """``P(M)`` for a symmetric dense ``M``."""
        return self.cls.from_dense(M, *self.options)

    def numel(self, dim: int) -> int:
        """Numbers stored by one member of dimension ``dim``."""
        return self.zeros(dim, device="meta").numel()

    def __str__(self) -> str:
        return self.name


def valid_forms() -> str:
    """A human-readable list of the accepted structure names."""
    forms = []
    for family, info in FAMILIES.items():
        if info.option_names:
            sizes = ",".join(info.option_names)
            forms.append(
                f"'{family}' (= '{family}:{','.join(map(str, info.defaults))}'), '{family}:{sizes}'"
            )
        else:
            forms.append(f"'{family}'")
    forms.append("'blockBdiagonal' (e.g. 'block30diagonal')")
    forms.append("'hierarchicalK1_K2' (e.g. 'hierarchical15_15')")
    return "; ".join(forms)


_LEGACY = [
    (re.compile(r"^block([1-9]\d*)diagonal$"), "blockdiagonal"),
    (re.compile(r"^hierarchical([1-9]\d*)_([1-9]\d*)$"), "hierarchical"),
]


def get_structure(name: str | StructureSpec) -> StructureSpec:
    """Parse a structure name; raise a ``ValueError`` listing the valid forms."""
    if isinstance(name, StructureSpec):
        return name
    if not isinstance(name, str):
        raise ValueError(
            f"A structure name must be a string, got {name!r}. Valid forms: {valid_forms()}."
        )
    text = name.strip().lower()
    for pattern, family in _LEGACY:
        match = pattern.match(text)
        if match:
            return _build(name, family, tuple(int(g) for g in match.groups()))
    family, colon, sizes = text.partition(":")
    if family not in FAMILIES:
        raise ValueError(f"Unknown structure {name!r}. Valid forms: {valid_forms()}.")
    info = FAMILIES[family]
    if not colon:
        return _build(name, family, info.defaults)
    well_formed = sizes != "" and re.fullmatch(r"\d+(,\d+)*", sizes) is not None
    options = tuple(int(s) for s in sizes.split(",")) if well_formed else ()
    if not options or len(options) != len(info.option_names):
        raise ValueError(
            f"Malformed structure {name!r}: {family!r} takes "
            f"{len(info.option_names)} integer size(s) ({', '.join(info.option_names) or 'none'})."
            f" Valid forms: {valid_forms()}."
        )
    return _build(name, family, options)


def _build(name: str, family: str, options: tuple[int, ...]) -> StructureSpec:
    info = FAMILIES[family]
    if len(options) != len(info.defaults) or any(o < 1 for o in options):
        raise ValueError(
            f"Malformed structure {name!r}: sizes must be positive integers "
            f"({', '.join(info.option_names)}). Valid forms: {valid_forms()}."
        )
    return StructureSpec(info.cls, options)
