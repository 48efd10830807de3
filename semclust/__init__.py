"""semclust: self-enhanced image clustering with cross-modal semantic consistency."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["SemanticClusterer", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `import semclust.ops` must not pay for open_clip / the training code
    if name == "SemanticClusterer":
        from .api import SemanticClusterer

        return SemanticClusterer
    raise AttributeError(f"module 'semclust' has no attribute {name!r}")
