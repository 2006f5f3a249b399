"""effdetr: efficient-DETR papers (ACT, Sparse DETR, Lite DETR, DETRDistill) in one pipeline."""
__version__ = "0.1.0"
