"""interpolatron: interpolation and extrapolation optimizers for PyTorch.

- :class:`Interpolatron`: k-step interpolation with fixed mixing coefficients.
- :class:`Anderson`: the same update with coefficients refit every step.
- :class:`RNA`: regularized nonlinear acceleration of any optimizer's iterates.
"""

from .backends import BackendUnavailable, availability
from .optim import Anderson, CheckpointError, Interpolatron
from .rna import RNA

__version__ = "0.1.0"
__all__ = ["Interpolatron", "Anderson", "RNA", "BackendUnavailable", "CheckpointError", "availability",
           "__version__"]
