"""tapc: prune pretrained language models to a target sparsity while they recover.

The public API; the `tapc` command is a thin layer over it.
"""

__version__ = "0.2.0"

from .compare import compare_runs  # noqa: E402
from .errors import ExportError, JobError, TapcError, UsageError  # noqa: E402
from .evaluate import evaluate_model, perplexity  # noqa: E402
from .export import export_model  # noqa: E402
from .sparse import load_sparse  # noqa: E402
from .generation import generate, open_decoder  # noqa: E402
from .models import load_model, prunable_weights  # noqa: E402
from .optim import TAAdamW  # noqa: E402
from .markdown import render_markdown  # noqa: E402
from .pipeline import Result, compress  # noqa: E402
from .plots import write_plots  # noqa: E402
from .pruner import Pruner  # noqa: E402
from .recipe import Recipe, builtin_recipes, load_recipe  # noqa: E402
from .report import inspect_checkpoint  # noqa: E402

__all__ = [
    "ExportError", "JobError", "Pruner", "Recipe", "Result", "TAAdamW", "TapcError", "UsageError",
    "builtin_recipes", "compare_runs", "compress", "evaluate_model", "export_model", "inspect_checkpoint",
    "generate", "load_model", "load_recipe", "load_sparse", "open_decoder", "perplexity", "prunable_weights", "render_markdown", "write_plots",
]
