from ._checkpoint import CheckpointError
from .anderson import Anderson
from .interpolatron import Interpolatron

__all__ = ["Anderson", "CheckpointError", "Interpolatron"]
