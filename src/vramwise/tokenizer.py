"""Tokenizer, chat template and incremental (streaming) detokenization.

`Tokenizer` wraps a transformers fast tokenizer loaded from an HF directory or converted from a GGUF
file's metadata. GGUF conversion is slow (~8 s for a 49k vocabulary), so the converted tokenizer is
saved under ~/.cache/vramwise/tokenizers/ and later loads take well under a second.

`IncrementalDetokenizer` turns a stream of token ids into a stream of printable text pieces.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Tokens that close a chat turn in common templates. A model trained on such a template stops by emitting
# one of them, which is often not the tokenizer's eos_token (Llama 3: eos is <|end_of_text|>, the turn
# ends with <|eot_id|>). They count as end-of-sequence only when the model's own template uses them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """A transformers fast tokenizer plus what the engine needs around it (stop tokens, chat template)."""

    def __init__(self, hf_tokenizer: Any, *, extra_eos_token_ids: Iterable[int] = (), source: str = "") -> None:
        self.hf = hf_tokenizer  # transformers PreTrainedTokenizerFast / TokenizersBackend
        self.source = source  # where it was loaded from, for messages
        eos: set[int] = {int(i) for i in extra_eos_token_ids if i is not None}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        template = self.chat_template or ""
        for tok in _END_OF_TURN_TOKENS:
            if tok in template:
                tid = self._token_to_id(tok)
                if tid is not None:
                    eos.add(tid)
        self._eos_token_ids = frozenset(eos)

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *, extra_eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """Load from an HF model directory (tokenizer.json / tokenizer_config.json / chat_template.jinja)."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory))
        return cls(hf, extra_eos_token_ids=extra_eos_token_ids, source=str(directory))

    @classmethod
    def from_gguf(
        cls,
        path: str | os.PathLike[str],
        *,
        extra_eos_token_ids: Iterable[int] = (),
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> "Tokenizer":
        """Convert the tokenizer stored in a GGUF file's metadata, caching the result on disk.

        cache_dir defaults to tokenizer_cache_dir(). The cache entry is keyed by the file's name, size
        and mtime (and the transformers version that converted it), so a replaced file is converted anew.
        """
        from transformers import AutoTokenizer

        path = Path(path).resolve()
        entry = Path(cache_dir or tokenizer_cache_dir()) / _cache_key(path)
        if entry.is_dir():
            try:
                hf = AutoTokenizer.from_pretrained(str(entry))
                return cls(hf, extra_eos_token_ids=extra_eos_token_ids, source=str(path))
            except Exception as e:  # a damaged cache entry must not make the model unusable
                logger.warning("ignoring unreadable tokenizer cache %s: %s", entry, e)
                shutil.rmtree(entry, ignore_errors=True)
        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        _save_atomically(hf, entry)
        return cls(hf, extra_eos_token_ids=extra_eos_token_ids, source=str(path))

    # ---- properties ------------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> set[int]:
        """Ids that end generation: eos, the config's eos ids, and the template's end-of-turn token."""
        return set(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added tokens).

        The model's embedding may be larger (padded); it is never smaller for a well-formed checkpoint.
        """
        return len(self.hf)

    @property
    def chat_template(self) -> str | None:
        tpl = getattr(self.hf, "chat_template", None)
        if isinstance(tpl, dict):  # several named templates: the engine uses the default one
            tpl = tpl.get("default")
        return tpl or None

    # ---- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of tokenization spaces: it rewrites " ." to "." depending on neighbouring tokens,
        # which would make streamed pieces disagree with the full decode.
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The chat template applied to messages, as text (what apply_chat_template tokenizes)."""
        if self.chat_template is None:
            raise ValueError(
                f"the model's tokenizer ({self.source or 'unknown source'}) has no chat template; "
                "send a plain completion prompt instead of chat messages"
            )
        try:
            text = self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
            )
        except Exception as e:  # jinja2 TemplateError (e.g. "roles must alternate") is a bad request
            raise ValueError(f"chat template failed on these messages: {e}") from e
        return str(text)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat. Special tokens come from the template text itself (e.g. a
        leading <|begin_of_text|>), so none are added on top."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    # ---- helpers ---------------------------------------------------------------------------------

    def _token_to_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or (self.hf.unk_token_id is not None and tid == self.hf.unk_token_id):
            return None
        return int(tid)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


class IncrementalDetokenizer:
    """Streams text for generated token ids, one token at a time.

    Two offsets into the token list delimit a small window (vLLM's technique): tokens[prefix_offset:read_offset]
    were already turned into text; decoding tokens[prefix_offset:] and dropping the window's old text
    gives the new text. Decoding from prefix_offset rather than read_offset keeps context-dependent
    spelling right (a leading space, a byte sequence split across tokens). Text that ends in U+FFFD is an
    incomplete UTF-8 character and is held back until a later token completes it.

    The pieces concatenated equal tokenizer.decode(output_ids) for byte-level BPE tokenizers (Llama 3,
    Qwen2, SmolLM2); for SentencePiece ones the first piece keeps the leading space that decode() drops
    at the start of a sequence, since here the text continues the prompt.
    Cost per token: two decodes of a few tokens, independent of sequence length.
    """

    # Prompt tokens used as left context for the first output token.
    _PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        start = max(len(prompt_token_ids) - self._PROMPT_CONTEXT, 0)  # works for lists, arrays and tensors
        self._ids: list[int] = [int(i) for i in prompt_token_ids[start:]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.output_token_ids: list[int] = []

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that became printable ("" if none yet)."""
        self._ids.append(int(token_id))
        self.output_token_ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # Slide the window: what was read becomes the new left context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Drop tokens left of the window so the list stays short on long generations.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text[len(prefix_text) :]

    def finish(self) -> str:
        """Text still held back at the end (an incomplete character, rendered as U+FFFD), if any."""
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


# ---- GGUF tokenizer cache -----------------------------------------------------------------------


def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers are kept: $XDG_CACHE_HOME/vramwise/tokenizers (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vramwise" / "tokenizers"


def _cache_key(path: Path) -> str:
    import transformers

    st = path.stat()
    ident = f"{path.name}|{st.st_size}|{st.st_mtime_ns}|transformers={transformers.__version__}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _save_atomically(hf_tokenizer: Any, entry: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: readers never see half an entry, and two
    processes converting the same file at once both succeed (the second rename loses harmlessly)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry is an ordinary cache directory
    except OSError as e:  # read-only home: work without the cache
        logger.warning("cannot cache the converted tokenizer under %s: %s", entry.parent, e)
        return
    try:
        hf_tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, entry)
    except OSError as e:
        if not entry.is_dir():
            logger.warning("cannot cache the converted tokenizer at %s: %s", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
