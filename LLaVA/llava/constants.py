"""Constants shared by the prompt builders, the tokenizer helpers and the model."""

CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
LOGDIR = "."

# Label value that the loss ignores (PyTorch's cross-entropy default).
IGNORE_INDEX = -100
# Placeholder id that `tokenizer_image_token` puts where an image goes; the model replaces each
# one by that image's visual tokens.
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
