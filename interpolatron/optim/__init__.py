from .anderson import Anderson
from .interpolatron import Interpolatron

__all__ = ["Anderson", "Interpolatron"]
