"""The positions seam: what a model knows about where a token is (the rotary embedding's
frequencies), changed in place on the live modules and their config; revert puts back the very
objects."""
