"""HF model directory: config.json + tokenizer files + *.safetensors (one file or sharded with an index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vramwise.config import ModelConfig
from vramwise.weights.base import WeightsError, WeightSource

if TYPE_CHECKING:
    from vramwise.tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes -> torch dtype names (what tensor_dtypes reports).
_ST_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: {what} is not valid JSON ({e})") from e
    except OSError as e:
        raise WeightsError(f"{path}: cannot read {what} ({e})") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: {what} should hold a JSON object")
    return data


class SafetensorsDirSource(WeightSource):
    """Reads tensors one at a time through safetensors' memory map, so peak RAM is one tensor."""

    def __init__(self, path: str | os.PathLike[str], *, show_progress: bool = True) -> None:
        self.path = str(path)
        self._dir = Path(path)
        self._show_progress = show_progress
        self._tokenizer: Tokenizer | None = None

        cfg_path = self._dir / "config.json"
        if not cfg_path.is_file():
            raise WeightsError(
                f"{self._dir}: no config.json; an HF model directory needs config.json, tokenizer files "
                "and *.safetensors weights"
            )
        self.hf_config = read_json(cfg_path, "config.json")
        try:
            config = ModelConfig.from_hf_dict(self.hf_config)
        except (KeyError, ValueError, TypeError) as e:
            raise WeightsError(f"{cfg_path}: cannot build the model config: {e!r}") from e
        # generation_config.json often lists more stop ids than config.json (Llama 3: <|eot_id|>).
        gen_path = self._dir / "generation_config.json"
        if gen_path.is_file():
            gen_eos = read_json(gen_path, "generation_config.json").get("eos_token_id")
            gen_ids = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
            merged = tuple(dict.fromkeys([*config.eos_token_ids, *(int(i) for i in gen_ids)]))
            config = config.with_overrides(eos_token_ids=merged)
        self.config = config

        # shard file -> tensor names in it (in index order); validated against the shard headers now,
        # so a broken checkpoint fails at open time, before any memory is spent on loading.
        self._shards: dict[Path, list[str]] = self._find_shards()
        self._dtype_counts: dict[str, int] = {}
        for shard, names in self._shards.items():
            self._check_shard(shard, names)

    # ---- discovery and validation ----------------------------------------------------------------

    def _find_shards(self) -> dict[Path, list[str]]:
        index_path = self._dir / INDEX_FILE
        if index_path.is_file():
            weight_map = read_json(index_path, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(f"{index_path}: no 'weight_map' in the safetensors index")
            shards: dict[Path, list[str]] = {}
            for name, fname in weight_map.items():
                shards.setdefault(self._dir / fname, []).append(name)
            for shard in shards:
                if not shard.is_file():
                    raise WeightsError(f"{shard}: shard listed in {INDEX_FILE} is missing")
            return shards
        files = sorted(self._dir.glob("*.safetensors"))
        if not files:
            other = [p.name for p in self._dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
            hint = f" (found {', '.join(sorted(other))}; only safetensors is supported in a directory)" if other else ""
            raise WeightsError(f"{self._dir}: no *.safetensors weight files{hint}")
        return {f: [] for f in files}  # names filled in from the headers by _check_shard

    def _check_shard(self, shard: Path, names: list[str]) -> None:
        """Open the shard's header (safetensors checks the file covers every tensor's data range), make
        sure every tensor the index promises is there, and count storage dtypes."""
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = list(f.keys())
                if not names:
                    names.extend(keys)
                present = set(keys)
                for name in names:
                    if name not in present:
                        raise WeightsError(f"{shard}: tensor {name!r} is listed in {INDEX_FILE} but missing from this shard")
                    dtype = f.get_slice(name).get_dtype()
                    key = _ST_DTYPE_NAMES.get(dtype, dtype)
                    self._dtype_counts[key] = self._dtype_counts.get(key, 0) + 1
        except WeightsError:
            raise
        except Exception as e:  # SafetensorError: truncated file, bad header
            raise WeightsError(f"{shard}: cannot read safetensors file ({e}); it is truncated or corrupt") from e

    # ---- WeightSource ----------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return [name for names in self._shards.values() for name in names]

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        total = sum(len(n) for n in self._shards.values())
        desc = f"Loading {self._dir.name}"
        with tqdm(total=total, desc=desc, unit="tensor", disable=not self._show_progress, leave=False) as bar:
            for shard, names in self._shards.items():
                try:
                    f = safe_open(str(shard), framework="pt")
                except Exception as e:
                    raise WeightsError(f"{shard}: cannot read safetensors file ({e}); it is truncated or corrupt") from e
                with f:
                    for name in names:
                        try:
                            tensor = f.get_tensor(name)
                        except Exception as e:
                            raise WeightsError(f"{shard}: cannot read tensor {name!r} ({e})") from e
                        bar.update(1)
                        yield name, tensor

    def disk_size_bytes(self) -> int:
        return sum(s.stat().st_size for s in self._shards)

    def tensor_dtypes(self) -> dict[str, int]:
        return dict(self._dtype_counts)

    def load_tokenizer(self) -> "Tokenizer":
        if self._tokenizer is None:
            from vramwise.tokenizer import Tokenizer

            if not any((self._dir / f).is_file() for f in _TOKENIZER_FILES):
                raise WeightsError(f"{self._dir}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
            try:
                self._tokenizer = Tokenizer.from_pretrained(self._dir, extra_eos_token_ids=self.config.eos_token_ids)
            except Exception as e:
                raise WeightsError(f"{self._dir}: cannot load the tokenizer: {e}") from e
        return self._tokenizer
