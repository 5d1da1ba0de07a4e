"""Every default and bound of the contract's fields, defined once: both sides and the transports read them."""

OPS = ("classify", "shapes", "finetune", "info", "revisions", "rollback", "reset")
TRAIN_LAYERS = ("all", "classifier")  # all: every parameter; classifier: the fully connected head only
REPLY_FORMATS = ("json", "packed")  # how the worker answers a classify request: the gateway asks packed
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_TRAIN_LAYERS = "all"
MAX_REQUEST_ID_CHARS = 128
