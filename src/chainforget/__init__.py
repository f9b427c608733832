"""chainforget: how language models forget safety tuning under chained fine-tuning."""

from chainforget.errors import ChainforgetError, ConfigError, DataError

__version__ = "0.1.0"
__all__ = ["ChainforgetError", "ConfigError", "DataError", "__version__"]
