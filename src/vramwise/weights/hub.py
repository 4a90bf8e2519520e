"""Hugging Face hub ids ("org/name"): download config, tokenizer and safetensors into the HF cache."""

from __future__ import annotations

import re

from vramwise.weights.base import WeightsError

# Only what a safetensors model directory needs: never *.bin / *.pth / *.gguf / images.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]

# Seconds to wait for the hub to answer a metadata request; a dead network should fail fast, not hang.
HUB_TIMEOUT_S = 5.0

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(model: str) -> bool:
    """"org/name" with hub-legal characters (the caller has already found no local path of that name)."""
    return bool(_HUB_ID_RE.match(model)) and not model.endswith((".gguf", ".safetensors"))


def download_from_hub(repo_id: str) -> str:
    """snapshot_download(repo_id) -> local directory. Uses the cached snapshot when offline, if there is one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, etag_timeout=HUB_TIMEOUT_S)
    except GatedRepoError as e:
        raise WeightsError(
            f"'{repo_id}' on the Hugging Face hub is gated: accept its license on the model page and log in "
            "(`hf auth login`), or pass a local directory or .gguf file"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise WeightsError(
            f"'{repo_id}' is neither a local path nor a model on the Hugging Face hub (or it is private: log in "
            "with `hf auth login`); pass a local directory or .gguf file"
        ) from e
    except Exception as e:  # offline mode, DNS failure, timeout, HTTP 5xx, disk full
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"could not download '{repo_id}' from the Hugging Face hub: no network? ({reason}). "
            f"No local path '{repo_id}' exists either; pass a local directory or .gguf file"
        ) from e
