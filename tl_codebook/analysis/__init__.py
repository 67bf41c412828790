"""Reading what codes mean: a code cache over a corpus (`cache`), code search and per-code
questions (`search`, `contexts`, `effects`), precision and recall against labelled concepts
(`concepts`), the offline code browser (`dashboard`) and the plots the reports draw (`plots`).

`CodeCache` is imported eagerly; the rest on first use, so importing the package stays cheap.
"""

from tl_codebook.analysis.cache import CodeCache, CodeCacheError, CodeIndex, UnknownCacheHookError

_LAZY = {
    "CodeMatch": "tl_codebook.analysis.search",
    "CodeContext": "tl_codebook.analysis.contexts",
    "write_dashboard": "tl_codebook.analysis.dashboard",
}


def __getattr__(name: str):  # noqa: ANN202 - module-level lazy attribute
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CodeCache",
    "CodeCacheError",
    "CodeContext",
    "CodeIndex",
    "CodeMatch",
    "UnknownCacheHookError",
    "write_dashboard",
]
