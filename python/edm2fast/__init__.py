"""edm2fast: EDM2 model, training, post-hoc EMA and sampling on top of mpkernels."""

__version__ = "0.1.0"
