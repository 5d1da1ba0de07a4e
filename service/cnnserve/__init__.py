"""cnnserve: model serving for convolutional image classifiers.

The package is layered so that each deployable part imports only what it runs:

- ``cnnserve.models``, ``card``, ``shapes``, ``preprocess``, ``runtime``, ``weights``: the model core (torch).
- ``cnnserve.errors``: the error tree shared by every layer (no dependencies).

Nothing is imported here eagerly: ``import cnnserve`` must stay cheap for the CLI and the gateway.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
