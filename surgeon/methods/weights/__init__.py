"""The weight seam: methods that wrap a layer (the original kept inside, put back on revert) or train
its own tensors in place; quantization replaces a layer by one that computes with its codes."""
