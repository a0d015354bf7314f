"""fastwsss: single-stage weakly-supervised semantic segmentation (ToCo, MCC) on a plain ViT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastwsss")  # pyproject.toml holds the one copy
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"


def version_string() -> str:
    """What ``--version`` prints: this package's version and the stack it runs on."""
    import platform

    import torch

    return f"fastwsss {__version__} (torch {torch.__version__}, Python {platform.python_version()})"
