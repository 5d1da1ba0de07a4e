"""The networks cnnserve serves, and a registry of them."""

from cnnserve.models.alexnet import AlexNet
from cnnserve.models.lenet import LeNet
from cnnserve.models.registry import MODELS, ModelSpec, build_model, get_spec

__all__ = ["AlexNet", "LeNet", "MODELS", "ModelSpec", "build_model", "get_spec"]
