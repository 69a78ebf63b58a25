"""Training backends: the PyTorch loop (CUDA and CPU) and the pieces it is built from."""
