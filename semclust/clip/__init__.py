"""CLIP: the open_clip encoder (images, texts, views, fine-tunable tail) and the noun vocabulary."""
