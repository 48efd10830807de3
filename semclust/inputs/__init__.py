"""Inputs: image sources (the `Source` contract), benchmark readers, embedding files, the store."""
