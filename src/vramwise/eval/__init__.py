"""Quality evaluation: perplexity over real text (``vramwise eval perplexity``); see eval/perplexity.py."""
