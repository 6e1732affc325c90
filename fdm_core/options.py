"""The names of the method's options (processes, samplers, parameterisations, weightings), torch-free.

Configs validate against these without importing torch, so planning a pipeline and checking its cache
stay cheap; the modules that implement each option import the same names from here.
"""

from __future__ import annotations

from typing import Literal, get_args

ProcessName = Literal["vp", "ve", "edm"]
Method = Literal["euler", "heun", "ddpm", "dpmpp_2m"]
METHODS: tuple[str, ...] = get_args(Method)
Parameterisation = Literal["x", "eps", "v"]
Weighting = Literal["snr", "truncated_snr", "snr_plus_one", "constant"]
TeacherSolver = Literal["euler", "heun"]  # a distillation teacher's two steps: DDIM or Heun
# Salimans & Ho: eps-prediction with truncated-SNR weighting diverges in progressive distillation.
UNSTABLE = frozenset({("eps", "truncated_snr")})


def check_stable(parameterisation: Parameterisation, weighting: Weighting, allow_unstable: bool) -> None:
    """Refuse eps-prediction with truncated-SNR weighting, which Salimans & Ho found to diverge."""
    if parameterisation not in get_args(Parameterisation):
        raise ValueError(f"parameterisation: expected x|v|eps (got {parameterisation!r})")
    if (parameterisation, weighting) in UNSTABLE and not allow_unstable:
        raise ValueError(
            f"parameterisation: {parameterisation!r} with {weighting!r} weighting diverges in "
            "progressive distillation (Salimans & Ho); use 'x' or 'v', or set allow_unstable"
        )
