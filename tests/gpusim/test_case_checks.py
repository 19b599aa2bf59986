"""The comparison rules of the simulated-GPU matrix (tests/gpusim/_cases.py)
catch what they must: fed the CPU reference itself they pass, fed one element
one ulp off, a dot product past its bound, or a skipped step that wrote, they
fail. Runs everywhere (no simulator: the "simulated" outputs here are the
reference, perturbed)."""

from __future__ import annotations

import io

import torch

from . import _cases as C


def _reference_outputs(case: C.Case) -> list[torch.Tensor]:
    return [(b.before if b.after is None else b.after).clone() for b in case.bufs]


def _case(**kw) -> C.Case:
    return C.combine_case("probe", torch.float32, 3, [37, 1, 4099], gen=torch.Generator().manual_seed(1),
                          gram=True, weight_decay=0.01, **kw)


def test_the_reference_passes_and_serialises():
    case = _case()
    assert C.check(case, _reference_outputs(case)) == []
    buf = io.BytesIO()
    case.serialise(buf)
    assert len(buf.getvalue()) > sum(b.before.numel() * b.before.element_size() for b in case.bufs)


def test_one_ulp_in_one_parameter_fails():
    case = _case()
    got = _reference_outputs(case)
    i = next(i for i, b in enumerate(case.bufs) if b.name == "param2")
    bits = got[i].view(torch.int32)
    bits[4000] += 1
    problems = C.check(case, got)
    assert len(problems) == 1 and problems[0].startswith("param2: 1 of 4099 elements differ; first at 4000")


def test_a_dot_product_past_its_bound_fails_within_it_passes():
    case = _case()
    got = _reference_outputs(case)
    i = next(i for i, b in enumerate(case.bufs) if b.name == "gram")
    b = case.bufs[i]
    bound = 4.0 * (b.n_terms + 1) * C.U64 * b.dots
    got[i] = b.after + 0.5 * bound
    assert C.check(case, got) == []
    got[i] = b.after + 2.0 * bound
    assert len(C.check(case, got)) == 1


def test_a_skipped_step_must_write_nothing():
    case = _case(grad_scale=4.0, found_inf=1.0)
    got = _reference_outputs(case)
    assert C.check(case, got) == []
    i = next(i for i, b in enumerate(case.bufs) if b.name == "x_hist")
    got[i] = got[i] + 1
    assert any(p.startswith("x_hist") and "unchanged expected" in p for p in C.check(case, got))
