"""Quality evaluation: perplexity over real text (``vramwise eval perplexity``)."""

from vramwise.eval.perplexity import PerplexityResult, perplexity, reference_text

__all__ = ["PerplexityResult", "perplexity", "reference_text"]
