"""Released checkpoints of the official repositories -> effdetr model files.

Each format module maps an official ``ckpt["model"]`` state dict onto effdetr's parameter
names (``mapping.StrictMapping``); loading is strict, so every tensor is accounted for.
"""
