"""Parameter sets shaped like real models (``--sets NAME[:SCALE]``): the
tensor shapes, their scaling, and parameters with fixed gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

Shape = tuple[int, ...]

def resnet50_shapes() -> list[Shape]:
    """The 161 parameter tensors of torchvision's ResNet-50 (25,557,032 elements),
    in ``named_parameters()`` order."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1.weight, bn1.bias
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = 4 * width  # Bottleneck expansion
            shapes += [(width, inplanes, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:  # downsample: 1x1 conv + batch norm
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> list[Shape]:
    """The 148 parameter tensors of GPT-2 small (124,439,808 elements; the LM head
    is tied to the token embedding), HuggingFace's Conv1D layout."""
    shapes: list[Shape] = [(vocab, width), (context, width)]  # wte, wpe
    for _ in range(layers):
        shapes += [(width,), (width,),                        # ln_1
                   (width, 3 * width), (3 * width,),          # attn.c_attn
                   (width, width), (width,),                  # attn.c_proj
                   (width,), (width,),                        # ln_2
                   (width, 4 * width), (4 * width,),          # mlp.c_fc
                   (4 * width, width), (width,)]              # mlp.c_proj
    shapes += [(width,), (width,)]  # ln_f
    return shapes


def many_small_shapes(blocks: int = 96, width: int = 32) -> list[Shape]:
    """A deep, narrow transformer: ``12 * blocks`` small tensors (1,152 and about
    1.2M elements by default) -- the regime where per-tensor launch and Python
    overhead, not bandwidth, decides the step time."""
    shapes: list[Shape] = []
    for _ in range(blocks):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes


def ten_thousand_small_shapes(count: int = 10_000) -> list[Shape]:
    """10,000 small tensors (biases, norms, small projections; about 2.2M
    elements): a launch-bound step, the case CUDA graphs are for."""
    sizes = [(64,), (128,), (32, 8), (256,), (16, 16), (96,), (48, 4), (512,)]
    return [sizes[i % len(sizes)] for i in range(count)]


_SET_BUILDERS: dict[str, tuple[Callable[[], list[Shape]], str]] = {
    "resnet50": (resnet50_shapes, "ResNet-50 (torchvision), 161 tensors"),
    "gpt2": (gpt2_shapes, "GPT-2 124M (tied head), 148 tensors"),
    "many-small": (many_small_shapes, "96-block width-32 transformer, 1,152 small tensors"),
    "10k-small": (ten_thousand_small_shapes, "10,000 small tensors"),
}
SET_NAMES = tuple(_SET_BUILDERS)


@dataclass(frozen=True)
class ParamSet:
    """A list of tensor shapes standing for a model's parameters."""

    name: str
    scale: float
    shapes: tuple[Shape, ...]
    description: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def label(self) -> str:
        return self.name if self.scale == 1.0 else f"{self.name}x{self.scale:g}"


def scale_shapes(shapes: Sequence[Shape], scale: float) -> list[Shape]:
    """Multiply every tensor's leading dimension by ``scale`` (at least 1):
    the tensor count stays, the element count scales by about ``scale``."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return [(max(1, round(s[0] * scale)),) + tuple(s[1:]) for s in shapes]


def param_set(name: str, scale: float = 1.0) -> ParamSet:
    """A named parameter set (``resnet50``, ``gpt2``, ``many-small``) at ``scale``."""
    if name not in _SET_BUILDERS:
        raise ValueError(f"unknown parameter set {name!r}; choose from {SET_NAMES}")
    build, description = _SET_BUILDERS[name]
    return ParamSet(name, float(scale), tuple(scale_shapes(build(), scale)), description)


def parse_set(token: str, scale: float = 1.0) -> ParamSet:
    """``"gpt2"`` or ``"gpt2:0.25"``; ``scale`` multiplies the token's own scale."""
    name, _, own = token.partition(":")
    return param_set(name, (float(own) if own else 1.0) * scale)


class _Holder(nn.Module):
    """The parameters as a module, so RNA can track them by name."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


def make_params(pset: ParamSet, device: torch.device | str, dtype: torch.dtype,
                seed: int = 0) -> list[nn.Parameter]:
    """Parameters of ``pset``'s shapes with fixed random gradients attached.

    Values are small (N(0, 0.02)) and gradients N(0, 1): a few dozen steps at
    lr 1e-3 keep everything finite in bfloat16."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in pset.shapes:
        # Generated on the CPU so every device gets the same numbers.
        p = nn.Parameter((0.02 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        params.append(p)
    return params
