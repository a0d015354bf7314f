"""fastwsss: single-stage weakly-supervised semantic segmentation (ToCo, MCC) on a plain ViT."""

__version__ = "0.1.0"
