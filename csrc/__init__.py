"""C++ / CUDA sources of the `ext` backend, installed as package data (`semclust.csrc`).

Built and loaded by `semclust.ext`; this file only makes the folder an importable package
so the sources can be located in regular and editable installs alike.
"""
