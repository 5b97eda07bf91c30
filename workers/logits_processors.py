"""The public import path for writing a logits processor, kept stable while the code lives in
`workers/sampling/logits_processors.py`:

    from workers.logits_processors import register_logits_processor
"""
from __future__ import annotations

from workers.sampling.logits_processors import LogitsProcessor, register_logits_processor, unregister_logits_processor

__all__ = ["LogitsProcessor", "register_logits_processor", "unregister_logits_processor"]
