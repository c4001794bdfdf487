"""User-facing errors. The CLI prints these as one line; anything else is a bug."""


class KnEditError(Exception):
    """Base class for every error caused by user input, data, configuration or environment."""


class UnknownModelError(KnEditError):
    """A model name or path that is neither an offline model, a local directory nor reachable on the hub."""


class UnsupportedArchitectureError(KnEditError):
    """A model whose FFN layout no adapter describes."""


class PromptError(KnEditError):
    """A prompt without its answer slot, an empty prompt, or prompts that do not fit together."""


class TargetError(KnEditError):
    """A target (answer) that is empty or cannot be expressed by the tokenizer."""


class ConfigError(KnEditError):
    """Malformed or unknown configuration keys and values."""


class DataError(KnEditError):
    """Malformed, missing or empty fact data."""


class EditError(KnEditError):
    """An edit that cannot be applied, saved or reverted as asked."""


class ProvisionError(KnEditError):
    """An offline model that could not be fetched or converted."""
