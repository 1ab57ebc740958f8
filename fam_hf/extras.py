"""Optional dependencies: imported where a feature needs them, with an error that names the extra to install.

``import fam_hf`` needs only the core dependencies (pyproject.toml ``dependencies``). A feature that needs
more (plots need matplotlib) asks :func:`require` for the module at the point of use, so a user without it
gets ``pip install 'fam_hf[plots]'`` instead of a bare ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# extra name -> the modules it provides (keep in step with [project.optional-dependencies])
EXTRAS = {
    "plots": ("matplotlib",),
    "deepspeed": ("deepspeed",),
    "bitsandbytes": ("bitsandbytes",),
    "trl": ("trl",),
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the feature, the module and the extra."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``) for ``feature`` (e.g. ``"fam-hf plot"``).

    Raises:
        MissingExtraError: the module's distribution is missing; says which ``fam_hf[extra]`` brings it.
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != top:
            raise  # the module is there but one of *its* dependencies is not: not ours to explain
        extra = next((name for name, modules in EXTRAS.items() if top in modules), None)
        fix = f"pip install 'fam_hf[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(f"{feature} needs {top}, which is not installed; install it with `{fix}`") from err
