"""iChat: run LLM inference engines in-process behind one small interface.

Importing this package imports no engine: vLLM and SGLang are loaded only when a
backend of theirs is created.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
