"""cnnserve's offline pipeline: datasets, training, export with parity checks, and archiving for TorchServe.

Imports go one way: this package uses :mod:`cnnserve` (models, model card, preprocessing); nothing in
:mod:`cnnserve` imports it, except the CLI, which is the composition root.
"""
