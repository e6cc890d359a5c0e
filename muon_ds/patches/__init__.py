"""Every reach of muon_ds into a framework's internals, one module per framework.

A patch states what it touches and the version range it was written for, and checks both
before touching anything (``require_version``, ``require_attribute``): a framework outside
the range, or one that renamed the patched attribute, fails at once with a message naming
the range and the attribute, instead of misbehaving later. Patches import no muon_ds
adapter: an adapter hands them its class or callback, so imports keep pointing down.
The diffs a user may apply to upstream sources instead live in the top-level ``patches/``.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from packaging.version import Version


class PatchError(RuntimeError):
    """A framework is not the one a patch was written for."""


def require_version(package: str, low: str, below: str, patch: str) -> Version:
    """The installed ``package``'s version, which must lie in ``[low, below)``."""
    try:
        found = Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        raise PatchError(
            f"{patch} needs {package} (>= {low}, < {below}); it is not installed"
        ) from None
    if not Version(low) <= found < Version(below):
        raise PatchError(
            f"{patch} was written for {package} >= {low}, < {below}; found {found}. "
            f"Check the patched code in that version, then widen the range in muon_ds.patches"
        )
    return found


def require_attribute(owner: Any, name: str, patch: str) -> Any:
    """``owner.name``, which the patch reads or replaces; a clear error if it is gone."""
    if not hasattr(owner, name):
        where = getattr(owner, "__name__", type(owner).__name__)
        raise PatchError(f"{patch} patches {where}.{name}, which this version does not have")
    return getattr(owner, name)


__all__ = ["PatchError", "require_attribute", "require_version"]
