"""pso_jax: PSO-secure synthetic medical images with diversity-aware EDM2 diffusion in JAX."""

__version__ = "0.1.0"
