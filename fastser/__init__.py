"""fastser: fast speech emotion recognition (Tripathi et al., 2020) on the GPU, end to end."""
__version__ = "0.1.0"
