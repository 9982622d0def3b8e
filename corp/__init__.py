"""corp: one-shot, label-free structured pruning of Vision Transformers with closed-form compensation (CORP)."""
__version__ = "0.1.0"

from .config import DEFAULT_ATTN_RIDGE, DEFAULT_MLP_RIDGE, METHODS, PruneConfig  # noqa: E402
from .pipeline import prune  # noqa: E402
from .io import load_model, load_pretrained, save_pretrained  # noqa: E402
from .lazy import meta_model  # noqa: E402
from .modules import PrunedAttention  # noqa: E402
from .report import BlockReport, PruneReport  # noqa: E402

__all__ = [
    "prune",
    "PruneConfig",
    "METHODS",
    "save_pretrained",
    "load_pretrained",
    "load_model",
    "meta_model",
    "PrunedAttention",
    "PruneReport",
    "BlockReport",
    "DEFAULT_MLP_RIDGE",
    "DEFAULT_ATTN_RIDGE",
    "__version__",
]
