"""The old module name of :mod:`interpolatron.backends.native_backend` (the
backend ``"cuda"`` is now ``"native"``: the C++ extension serves CPU tensors
too). Kept so that old imports work; new code imports native_backend."""

from .native_backend import *  # noqa: F401,F403
from .native_backend import _C, _IMPORT_ERROR  # noqa: F401
