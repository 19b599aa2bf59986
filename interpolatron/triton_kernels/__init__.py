"""Triton kernels of interpolatron (``interpolatron.triton_kernels``).

One module per op, each with its ``_<op>_kernel`` and the ``<op>`` launcher
that :mod:`interpolatron.backends.triton_backend` calls:

- :mod:`.combine`: the interpolation step (Interpolatron; Anderson's update pass)
- :mod:`.gram_row`: the Gram row of a new gradient (Anderson's read-only pass; RNA's
  gradient record, which also stores it)
- :mod:`.rna`: RNA's record (with the Gram row of differences) and extrapolation
- :mod:`.reduce`: fixed-order float64 reduction of per-program partials
- :mod:`._launch`: launch settings, pointer tables, device scalars (host side)
- :mod:`._helpers`: device helpers shared by the kernels

Nothing is imported here, so that importing the package never requires Triton.
"""
