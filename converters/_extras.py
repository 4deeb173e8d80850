"""Imports of the optional frameworks that the torch and Keras converters need.

Neither framework is a dependency of onnxeps: each converter imports its framework
through :func:`import_extra` when it runs, so a missing extra is one clear error.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "import_extra"]


class MissingExtraError(ImportError):
    """An optional framework that a converter needs is not installed."""


def import_extra(module: str, label: str, extra: str) -> ModuleType:
    """Import ``module``, or raise MissingExtraError naming the extra to install.

    Only a missing ``module`` itself becomes MissingExtraError. An import that fails
    inside an installed framework (a missing dependency of it, a broken build) raises
    its own error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module.split(".")[0]:
            raise
        raise MissingExtraError(
            f"{label} is not installed; pip install 'onnxeps[{extra}]'"
        ) from None
