"""Values shared across layers. The bottom layer: this module imports nothing."""

# Label value that the loss, the fused cross-entropy and the accuracy counts skip (PyTorch's
# cross_entropy default), e.g. every position of a synthetic task that is not an answer.
IGNORE_INDEX = -100
