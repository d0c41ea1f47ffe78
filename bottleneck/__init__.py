"""bottleneck: transfer learning on images, fixed features or fine-tuning, with their costs.

Each stage is a function taking the same settings as its command (`bottleneck.settings`):

    import bottleneck
    cache = bottleneck.extract("efficientnet_lite0", "data/elpv", layer=["blocks.4", "pool"])
    report = bottleneck.fit(cache, clf="logreg", search=True)
"""

__version__ = "0.1.0"

import importlib
import sys
import types

from bottleneck.stages import STAGES

# The functions, not their modules, answer to these names (`bottleneck.extract` is the stage;
# its module stays importable as `import bottleneck.extract`). They load on first use, so that
# `import bottleneck` and the command's --help do not pay for torch and scikit-learn.
_EXPORTS = {s.command: (s.module, s.function) for s in STAGES} | {
    "evaluate": ("predict", "evaluate"), "predict": ("predict", "predict"), "run": ("pipeline", "run"),
    "export": ("export", "export")}

__all__ = ["extract", "fit", "finetune", "evaluate", "predict", "export", "compare", "run", "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bottleneck' has no attribute {name!r}")
    module, function = _EXPORTS[name]
    return getattr(importlib.import_module(f"bottleneck.{module}"), function)


class _Package(types.ModuleType):
    """Importing the module bottleneck.extract sets the package's attribute `extract` to that module;
    the stage function of the same name takes its place, as when the package imported it eagerly."""

    def __setattr__(self, name: str, value) -> None:
        module, function = _EXPORTS.get(name, (None, None))
        if isinstance(value, types.ModuleType) and module == name and hasattr(value, function):
            value = getattr(value, function)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
