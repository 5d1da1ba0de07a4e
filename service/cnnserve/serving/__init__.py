"""The TorchServe worker side: revision store, fine-tuning, and the model service.

``handler.py`` is the thin TorchServe entry point; everything it does is in plain, tested modules here:

- :mod:`.revisions` the revision store shared by every worker of a model (safetensors + manifest + lock)
- :mod:`.finetune`  one SGD step as a plain function
- :mod:`.service`   :class:`ModelService`, which answers a TorchServe batch
- :mod:`.config`    the worker's settings (archive's model-config.yaml, environment)

What a request and a reply are, in the three encodings TorchServe hands over, is :mod:`cnnserve.contract`,
shared with the gateway.
"""
