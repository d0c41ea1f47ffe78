"""bottleneck: transfer learning on images, fixed features or fine-tuning, with their costs.

Each stage is a function taking the same settings as its command (`bottleneck.settings`):

    import bottleneck
    cache = bottleneck.extract("efficientnet_lite0", "data/elpv", layer=["blocks.4", "pool"])
    report = bottleneck.fit(cache, clf="logreg", search=True)
"""

__version__ = "0.1.0"

# The functions, not their modules, answer to these names (`bottleneck.extract` is the stage;
# its module stays importable as `import bottleneck.extract`).
from bottleneck.classify import fit  # noqa: E402
from bottleneck.compare import compare  # noqa: E402
from bottleneck.extract import extract  # noqa: E402
from bottleneck.finetune import finetune  # noqa: E402
from bottleneck.pipeline import run  # noqa: E402
from bottleneck.predict import evaluate, predict  # noqa: E402

__all__ = ["extract", "fit", "finetune", "evaluate", "predict", "compare", "run", "__version__"]
