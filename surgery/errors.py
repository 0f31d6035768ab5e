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


def check_count(value, what: str, minimum: int = 1, error: type[SurgeryError] = SurgeryError) -> None:
    """Refuse anything but an integer >= ``minimum`` (bools too), naming ``what``:
    ``check_count(k, "--k-features")`` -> "--k-features must be a positive integer, got 0"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{what} must be {want}, got {value!r}")
