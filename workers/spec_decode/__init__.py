"""Speculative decoding's self-contained parts: ngram (prompt-lookup) proposals, rejection sampling of the
proposals against the target model, and the acceptance counters the metrics report."""
