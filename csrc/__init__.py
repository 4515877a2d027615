"""CUDA C++ sources, installed as data beside the package (`cdgfast.csrc`)."""
