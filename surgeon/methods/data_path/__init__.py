"""The data-path seam: modules added in the data path of each layer (bottleneck adapters), wired in
with forward hooks on the layer's own modules; revert removes the hooks and the modules."""
