"""The TorchServe worker side: request protocol, revision store, fine-tuning, and the model service.

``handler.py`` is the thin TorchServe entry point; everything it does is in plain, tested modules here:

- :mod:`.protocol`  TorchServe request dicts -> typed requests, and responses -> JSON bodies
- :mod:`.revisions` the revision store shared by every worker of a model (safetensors + manifest + lock)
- :mod:`.finetune`  one SGD step as a plain function
- :mod:`.service`   :class:`ModelService`, which answers a TorchServe batch
"""
