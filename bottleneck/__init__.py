"""bottleneck: transfer learning on images, fixed features or fine-tuning, with their costs."""

__version__ = "0.1.0"

from bottleneck.extract import extract  # noqa: E402

__all__ = ["extract", "__version__"]
