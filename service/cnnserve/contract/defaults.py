"""Every default and bound of the contract's fields, defined once: both sides and the transports read them."""

OPS = ("classify", "shapes", "finetune", "info", "revisions", "rollback", "reset")
TRAIN_LAYERS = ("all", "classifier")  # all: every parameter; classifier: the fully connected head only
# How the worker answers a classify request: JSON (what TorchServe-direct clients get), or the packed binary
# body the gateway asks for.
DEFAULT_REPLY = "json"
PACKED_REPLY = "packed"
REPLY_FORMATS = (DEFAULT_REPLY, PACKED_REPLY)
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_TRAIN_LAYERS = "all"
MAX_REQUEST_ID_CHARS = 128
