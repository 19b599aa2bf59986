"""The old module name of :mod:`interpolatron.backends.native_backend` (the
backend ``"cuda"`` is now ``"native"``: the C++ extension serves CPU tensors
too). Kept so that old imports work, with a FutureWarning; it will be removed
in interpolatron 0.3.0. New code imports native_backend."""

import warnings

from .native_backend import *  # noqa: F401,F403
from .native_backend import _C, _IMPORT_ERROR  # noqa: F401

warnings.warn("interpolatron.backends.cuda_backend is deprecated and will be removed in interpolatron 0.3.0: "
              "import interpolatron.backends.native_backend (the backend 'cuda' is now named 'native')",
              FutureWarning, stacklevel=2)
