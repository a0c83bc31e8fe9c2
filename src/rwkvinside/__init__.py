"""RWKVInside: distil a Hugging Face causal LM into an RWKV-7 model.

Importing this package is cheap: nothing touches CUDA, compiles or prints.
"""

from rwkvinside.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
