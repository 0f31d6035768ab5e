"""Exceptions.  Every error a user can cause is a SurgeryError whose message is
one line naming the culprit (file, tensor or field); the CLI prints it without a
traceback and exits with status 2."""


class SurgeryError(Exception):
    """Base class for user-facing errors."""


class CheckpointError(SurgeryError):
    """A checkpoint (folder, shard, index, GGUF, Hub id) cannot be read or written."""


class ArchitectureError(SurgeryError):
    """A model's tensors cannot be placed (unknown model_type, unmatched tensors)."""


class PromptError(SurgeryError):
    """A prompt source is missing, empty or malformed."""


class DirectionError(SurgeryError):
    """A direction file is malformed or does not fit the model."""


class ManifestError(SurgeryError):
    """A manifest is missing, malformed or does not match the files."""
