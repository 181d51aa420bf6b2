"""qat.kernels: int4 inference kernels (this folder installs as `qat.kernels`).

Imports torch only (triton when present): a deployment can use these without qat's
training stack (Lightning, omegaconf, wandb). The folder is `kernels/` in the source
tree; the import name is `qat.kernels` so it cannot collide with the PyPI package
`kernels`.
"""
