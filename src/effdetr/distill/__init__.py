"""Knowledge distillation losses (ACT's MTKD; DETRDistill later)."""
