"""The distributed cases of tests/_support/_dist_cases.py run with one-pass Anderson:
each rank (and the single-process reference) swaps ``interpolatron.Anderson``
for ``Anderson(one_pass=True)`` while a case runs, so the cases themselves
(layouts, GradScaler, membership changes, wrappers, checkpoints) are the
ones exact Anderson is tested with."""

from __future__ import annotations

import contextlib
import functools

import _dist_cases as C

import interpolatron


@contextlib.contextmanager
def one_pass():
    exact = interpolatron.Anderson
    interpolatron.Anderson = functools.partial(exact, one_pass=True)
    try:
        yield
    finally:
        interpolatron.Anderson = exact


def suite(rank, world, cases):
    """Every case of :func:`_dist_cases.suite` with one-pass Anderson."""
    with one_pass():
        return C.suite(rank, world, cases)


def reference(name, *args, **kwargs):
    """The single-process ``_dist_cases.<name>(*args)`` with one-pass Anderson."""
    with one_pass():
        return getattr(C, name)(*args, **kwargs)
