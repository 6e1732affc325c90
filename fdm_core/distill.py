"""Progressive distillation (Salimans & Ho 2022): one student DDIM step learns two teacher DDIM steps.

A teacher of 2N steps on sigma_0 > sigma_1 > ... > sigma_2N = 0 teaches a student of N steps on the even
points. For a student step from sigma_t = sigma_2i to sigma_s = sigma_2i+2 the teacher takes two DDIM steps
x_t -> x_mid -> x_s, and the student's x0-target x~ is the one whose single DDIM step lands on x_s:

    x_s = x~ + (sigma_s/sigma_t)(x_t - x~)   =>   x~ = (x_s - (sigma_s/sigma_t) x_t) / (1 - sigma_s/sigma_t).

The loss is w(sigma_t) |D_student(x_t, sigma_t) - x~|^2 (docs/design.md: Progressive distillation). The
teacher's two steps may use Heun instead of DDIM (`solver`): x~ then makes one student DDIM step land where
two teacher Heun steps land, so a first round starts from the teacher's better solver; the student still
samples with DDIM.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fdm_core import targets
from fdm_core.options import Parameterisation, TeacherSolver, Weighting, check_stable
from fdm_core.precond import Denoiser, Head
from fdm_core.processes import Process
from fdm_core.samplers import step_delta
from fdm_core.tensors import append_dims

DenoiserFn = Callable[[Tensor, Tensor], Tensor]
# The student heads that implement each parameterisation; the first is what `make_student` sets.
HEADS: dict[str, tuple[Head, ...]] = {"x": ("precond", "x"), "v": ("v",), "eps": ("eps",)}


def student_grid(teacher_sigmas: Tensor) -> Tensor:
    """The student's N-step grid sigma_0, sigma_2, ..., sigma_2N: every other point of the teacher's 2N."""
    s = torch.as_tensor(teacher_sigmas, dtype=torch.float64)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError("teacher_sigmas: expected a 1-D grid of decreasing sigmas ending in 0")
    steps = len(s) - 1
    if steps % 2:
        raise ValueError(f"teacher_sigmas: an odd number of steps ({steps}) cannot be halved")
    if float(s[-1]) != 0.0:
        raise ValueError(f"teacher_sigmas: must end at 0 (got {float(s[-1])})")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError("teacher_sigmas: must be strictly decreasing")
    return s[::2]


def ddim_step(x_t: Tensor, denoised: Tensor, sigma_t: Tensor, sigma_s: Tensor) -> Tensor:
    """x_s = D + (sigma_s/sigma_t)(x_t - D): deterministic DDIM, i.e. Euler on the probability-flow ODE."""
    return denoised + append_dims(sigma_s / sigma_t, x_t) * (x_t - denoised)


def teacher_step(
    teacher: DenoiserFn, x: Tensor, sigma_t: Tensor, sigma_s: Tensor, solver: TeacherSolver
) -> Tensor:
    """One teacher step: DDIM in its closed form (exact D where sigma_s = 0), or Heun."""
    if solver == "euler":
        return ddim_step(x, teacher(x, sigma_t), sigma_t, sigma_s)
    return x + step_delta(teacher, x, sigma_t, sigma_s, solver)


@torch.no_grad()
def distill_target(
    teacher: DenoiserFn,
    x_t: Tensor,
    sigma_t: Tensor,
    sigma_mid: Tensor,
    sigma_s: Tensor,
    solver: TeacherSolver = "euler",
) -> Tensor:
    """The student's x0-target x~ from two teacher steps sigma_t -> sigma_mid -> sigma_s (per sample), each
    a DDIM (`euler`) or a Heun step (2 evaluations; Euler on a step to sigma = 0).

    Where sigma_s = 0 the ratio is 0 and x~ is exactly the teacher's x_s.
    """
    x_mid = teacher_step(teacher, x_t, sigma_t, sigma_mid, solver)
    x_s = teacher_step(teacher, x_mid, sigma_mid, sigma_s, solver)
    ratio = append_dims(sigma_s / sigma_t, x_t)
    return (x_s - ratio * x_t) / (1 - ratio)


def student_process(process: Process) -> Process:
    """The process of a distilled student: an FDM teacher's, seeing its input everywhere (`see_input`).

    FDM's gamma(sigma_max) sigma_max ~ 3e-6 under EDM hides x from the network at the first grid point, which
    costs a many-step sampler little (its next steps still carry x) but takes a 2-step student's first jump
    (to sigma ~ 2.6) blind and leaves a 1-step student nothing to map. Elsewhere c_in is unchanged, so the
    student starts as the teacher at every other grid point."""
    return dataclasses.replace(process, see_input=True) if process.fdm else process


def make_student(teacher: Denoiser, parameterisation: Parameterisation = "x") -> Denoiser:
    """A trainable copy of the teacher with the output head of `parameterisation`, dropout 0 (reference) and
    the `student_process` of the teacher's.

    A teacher whose head already implements it (x: the preconditioned x0 head) keeps it, so the student
    starts exactly as the teacher (but for c_in where an FDM teacher is blind); another head starts the
    student from a different function.
    """
    if parameterisation not in HEADS:
        raise ValueError(f"parameterisation: expected x|v|eps (got {parameterisation!r})")
    student = copy.deepcopy(teacher)
    student.process = student_process(teacher.process)
    if student.head not in HEADS[parameterisation]:
        student.head = HEADS[parameterisation][0]
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if "dropout" in getattr(student.net, "config", {}):
        student.net.config["dropout"] = 0.0
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def distill_loss(
    student: DenoiserFn,
    teacher: DenoiserFn,
    x0: Tensor,
    teacher_sigmas: Tensor,
    weighting: Weighting = "truncated_snr",
    parameterisation: Parameterisation = "x",
    generator: torch.Generator | None = None,
    allow_unstable: bool = False,
    solver: TeacherSolver = "euler",
) -> Tensor:
    """w(sigma_t) |D_student(x_t, sigma_t) - x~|^2 averaged, with a student step i ~ U{0..N-1} per sample.

    `teacher_sigmas` is the teacher's 2N-step grid; sigma_t, sigma_mid, sigma_s = sigma_2i, sigma_2i+1,
    sigma_2i+2. `parameterisation` must match the student's head (see `make_student`); `solver` is the
    teacher's (see `distill_target`).
    """
    check_stable(parameterisation, weighting, allow_unstable)
    head = getattr(student, "head", None)
    if head is not None and head not in HEADS[parameterisation]:
        raise ValueError(f"parameterisation: {parameterisation!r} but the student's head is {head!r}")
    steps = len(student_grid(teacher_sigmas)) - 1
    full = torch.as_tensor(teacher_sigmas, dtype=torch.float64).cpu()
    i = torch.randint(0, steps, (x0.shape[0],), generator=generator)
    n = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    sigma_t, sigma_mid, sigma_s = (full[2 * i + k].to(x0.device) for k in range(3))
    x_t = x0 + append_dims(sigma_t, x0) * n
    target = distill_target(teacher, x_t, sigma_t, sigma_mid, sigma_s, solver)
    w = append_dims(targets.weighting(weighting, sigma_t), x0)
    return (w * (student(x_t, sigma_t) - target) ** 2).mean()


__all__ = [
    "check_stable",
    "ddim_step",
    "distill_loss",
    "distill_target",
    "make_student",
    "student_grid",
    "student_process",
]
