"""The names of the method's options (processes, samplers, Picard solvers, actor placements,
parameterisations, weightings) and Picard's default window and tolerance, torch-free.

Configs validate against these without importing torch, so planning a pipeline and checking its cache
stay cheap; the modules that implement each option import the same names from here.
"""

from __future__ import annotations

from typing import Literal, get_args

ProcessName = Literal["vp", "ve", "edm"]
# x_{i+1} = x_i + Δ_i(x_i) + σ_up,i z_i: the samplers whose trajectory Picard iteration reproduces.
SingleStepMethod = Literal["euler", "heun", "ddpm"]
SINGLE_STEP_METHODS: tuple[str, ...] = get_args(SingleStepMethod)
Method = Literal[SingleStepMethod, "dpmpp_2m"]
METHODS: tuple[str, ...] = get_args(Method)
Solver = Literal["picard", "anderson"]  # Picard's fixed-point solver: plain (ParaDiGMS) or ParaTAA's Anderson
SOLVERS: tuple[str, ...] = get_args(Solver)
PICARD_WINDOW = 64  # steps evaluated in parallel (ParaDiGMS's p)
PICARD_TOL = 0.1  # tolerance tau on the per-step error
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]  # Ray placement of a pool of actors
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
