"""torchsingd: structured inverse-free natural gradient descent for PyTorch.

``SINGD`` (Lin, Dangel et al., ICML 2024) is a KFAC-like optimizer that never inverts
a matrix (so it runs in bfloat16) and keeps its Kronecker factors in structured
matrix groups (:mod:`torchsingd.structures`), so its memory can drop to AdamW's.
"""

from torchsingd.layers import LayerAdapter, register_layer, unregister_layer
from torchsingd.optim import KFAC, SINGD
from torchsingd.structures import get_structure

__version__ = "0.1.0"
__all__ = [
    "KFAC",
    "SINGD",
    "LayerAdapter",
    "get_structure",
    "register_layer",
    "unregister_layer",
    "__version__",
]
