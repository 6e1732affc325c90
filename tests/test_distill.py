"""Progressive distillation: the exact target on Gaussian data, two halving rounds of a toy MLP teacher,
resumable rounds, and the guards (eps + truncated SNR, odd step counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fdm_core.analytic import GaussianDenoiser
from fdm_core.distill import (
    distill_loss,
    distill_target,
    make_student,
    student_grid,
    student_process,
)
from fdm_core.metrics import sliced_wasserstein
from fdm_core.networks import MLP, UNet
from fdm_core.precond import Denoiser
from fdm_core.processes import make_process
from fdm_core.samplers import get_sigmas, process_grid, sample, step_delta
from infra.manifest import MANIFEST_NAME
from infra.store import open_store
from tasks.checkpoints import load_model, model_spec, write_model
from tasks.distillation.gate import passes_quality_gate
from tasks.registry import STAGES
from tasks.stage import StageContext, StageResult, run_stage
from tasks.stages.distill_round import DistillConfig, DistillRoundConfig
from tasks.stages.prepare_data import DataConfig
from tasks.stages.train_base import ModelConfig, TrainBaseConfig, TrainConfig


def distill(cfg: DistillConfig, teacher: str, teacher_steps: int, dataset: str, r: int, ctx) -> StageResult:
    """One round through the edge that persists its output, as the executor runs it."""
    round_cfg = DistillRoundConfig(**cfg.model_dump(), teacher_steps=teacher_steps, round_index=r)
    return run_stage(STAGES["distill_round"], round_cfg, ctx, teacher=teacher, dataset=dataset)


# --- the target, exactly ---------------------------------------------------------------------------
@pytest.mark.parametrize("grid", ["karras", "vp"])
def test_one_student_step_lands_on_two_teacher_steps(grid: str) -> None:
    """With the exact Gaussian denoiser, one student DDIM step with x0-estimate x~ from sigma_t reproduces
    the teacher's two DDIM steps to sigma_s, for every student step (including sigma_s = 0) in one batch."""
    teacher = GaussianDenoiser(mu=0.3, s=0.5)
    sigmas = get_sigmas(grid, 8)  # float64, 8 teacher steps -> 4 student steps
    steps = len(student_grid(sigmas)) - 1
    g = torch.Generator().manual_seed(0)
    i = torch.arange(64) % steps  # every student step, mixed in one batch
    sigma_t, sigma_mid, sigma_s = sigmas[2 * i], sigmas[2 * i + 1], sigmas[2 * i + 2]
    x0 = 0.3 + 0.5 * torch.randn(64, 3, 2, dtype=torch.float64, generator=g)
    x_t = x0 + sigma_t[:, None, None] * torch.randn(64, 3, 2, dtype=torch.float64, generator=g)

    x_tilde = distill_target(teacher, x_t, sigma_t, sigma_mid, sigma_s)
    student_step = x_t + step_delta(lambda x, s: x_tilde, x_t, sigma_t, sigma_s, "euler")
    x_mid = x_t + step_delta(teacher, x_t, sigma_t, sigma_mid, "euler")
    two_teacher_steps = x_mid + step_delta(teacher, x_mid, sigma_mid, sigma_s, "euler")

    err = (student_step - two_teacher_steps).abs().amax(dim=(1, 2)) / two_teacher_steps.abs().amax(dim=(1, 2))
    assert float(err.max()) < 1e-10, err
    last = sigma_s == 0
    assert int(last.sum()) == 16
    # sigma_s = 0: x~ is x_s itself, the teacher's x0-estimate at x_mid, bit for bit.
    d = teacher(x_t, sigma_t)
    x_mid_ddim = d + (sigma_mid / sigma_t)[:, None, None] * (x_t - d)
    assert torch.equal(x_tilde[last], teacher(x_mid_ddim, sigma_mid)[last])


def test_heun_targets_make_one_student_step_land_on_two_teacher_heun_steps() -> None:
    """With `solver="heun"` one student DDIM step lands where two teacher Heun steps (written out here)
    land, and on a 32-step grid that point is nearer the exact ODE solution of Gaussian data than two DDIM
    steps' (measured: worst relative error 0.014 against 0.31)."""
    teacher = GaussianDenoiser(mu=0.3, s=0.5)
    sigmas = get_sigmas("karras", 32)
    g = torch.Generator().manual_seed(1)
    i = torch.arange(15)  # the student steps that do not end at sigma = 0
    sigma_t, sigma_mid, sigma_s = sigmas[2 * i], sigmas[2 * i + 1], sigmas[2 * i + 2]
    x_t = 0.3 + (0.5**2 + sigma_t[:, None] ** 2).sqrt() * torch.randn(15, 4, dtype=torch.float64, generator=g)

    def heun(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (x - teacher(x, a)) / a[:, None]
        x_e = x + (b - a)[:, None] * d
        return x + (b - a)[:, None] * (d + (x_e - teacher(x_e, b)) / b[:, None]) / 2

    x_tilde = distill_target(teacher, x_t, sigma_t, sigma_mid, sigma_s, "heun")
    student_step = x_tilde + (sigma_s / sigma_t)[:, None] * (x_t - x_tilde)
    two_heun = heun(heun(x_t, sigma_t, sigma_mid), sigma_mid, sigma_s)
    torch.testing.assert_close(student_step, two_heun, rtol=1e-10, atol=1e-10)

    exact = torch.stack([teacher.ode_solution(x_t[k], float(sigma_t[k]), float(sigma_s[k])) for k in i])
    ddim = distill_target(teacher, x_t, sigma_t, sigma_mid, sigma_s, "euler")
    ddim_step = ddim + (sigma_s / sigma_t)[:, None] * (x_t - ddim)

    def rel_error(x: torch.Tensor) -> float:
        return float(((x - exact).abs().amax(dim=1) / (exact - x_t).abs().amax(dim=1)).max())

    assert rel_error(two_heun) < 0.1 * rel_error(ddim_step)


def test_student_grid_halves_and_refuses_odd_steps() -> None:
    teacher = get_sigmas("karras", 8)
    student = student_grid(teacher)
    assert len(student) == 5 and float(student[-1]) == 0.0
    assert torch.equal(student, teacher[::2])
    assert len(student_grid(student)) == 3
    with pytest.raises(ValueError, match=r"odd number of steps \(1\)"):
        student_grid(get_sigmas("karras", 1))
    with pytest.raises(ValueError, match=r"teacher_sigmas: an odd number of steps \(3\) cannot be halved"):
        student_grid(get_sigmas("karras", 3))
    with pytest.raises(ValueError, match="end at 0"):
        student_grid(torch.tensor([3.0, 2.0, 1.0]))
    with pytest.raises(ValidationError, match="teacher_steps"):
        DistillRoundConfig(teacher_steps=1)


def test_eps_with_truncated_snr_is_refused() -> None:
    teacher = Denoiser(MLP(2, hidden=16, depth=1), make_process("edm"))
    student = make_student(teacher, "eps")
    x0, sigmas = torch.randn(8, 2), get_sigmas("karras", 4)
    with pytest.raises(ValueError, match="parameterisation: 'eps' with 'truncated_snr'"):
        distill_loss(student, teacher, x0, sigmas, "truncated_snr", "eps")
    with pytest.raises(ValidationError, match="parameterisation"):
        DistillConfig(parameterisation="eps")
    forced = distill_loss(student, teacher, x0, sigmas, "truncated_snr", "eps", allow_unstable=True)
    assert torch.isfinite(forced)
    assert torch.isfinite(distill_loss(student, teacher, x0, sigmas, "snr", "eps"))
    assert DistillConfig(parameterisation="eps", weighting="snr").parameterisation == "eps"
    with pytest.raises(ValueError, match="student's head is 'eps'"):
        distill_loss(student, teacher, x0, sigmas, "truncated_snr", "v")


def test_make_student_keeps_a_matching_head() -> None:
    teacher = Denoiser(UNet(8, 1, 8, (1, 2), 1, (), dropout=0.3), make_process("edm", fdm=True)).eval()
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0, 80.0])
    student = make_student(teacher, "x")
    assert student.head == "precond" and student.training
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    assert student.net.config["dropout"] == 0.0 and teacher.net.config["dropout"] == 0.3
    assert torch.equal(student.eval()(x, sigma), teacher(x, sigma))  # starts exactly as the teacher
    v_student = make_student(teacher, "v")
    assert v_student.head == "v"
    assert make_student(v_student, "v").head == "v"


def test_quality_gate() -> None:
    assert passes_quality_gate(1.1, 1.0, max_ratio=1.2)
    assert not passes_quality_gate(1.3, 1.0, max_ratio=1.2)
    assert not passes_quality_gate(float("nan"), 1.0, max_ratio=1.2)
    with pytest.raises(ValueError, match="max_ratio"):
        passes_quality_gate(1.0, 1.0, max_ratio=0)


# --- stage rounds on a toy MLP teacher ----------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Eight Gaussians in 2-D and an EDM MLP teacher trained on them with tasks.train_base (~10 s)."""
    root = str(tmp_path_factory.mktemp("distill"))
    data_cfg = DataConfig(source={"kind": "toy2d", "toy": "eight_gaussians", "n": 4000})
    dataset = run_stage(STAGES["prepare_data"], data_cfg, StageContext(root, "data")).outputs["dataset"]
    train_cfg = TrainConfig(
        process="edm", fdm=False, steps=800, batch_size=256, lr=3e-3, lr_rampup=50, ema_decay=0.99
    )
    model_cfg = ModelConfig(kind="mlp", hidden=128, depth=3)
    teacher = run_stage(
        STAGES["train_base"],
        TrainBaseConfig(model=model_cfg, train=train_cfg),
        StageContext(root, "teacher", key="teacher"),
        dataset=dataset,
    )
    return {"root": root, "dataset": dataset, "teacher": teacher.outputs["model"]}


def _load(uri: str) -> tuple[Denoiser, dict]:
    return load_model(open_store(uri), "")


def _euler(model: Denoiser, noise: torch.Tensor, grid: list[float]) -> torch.Tensor:
    return sample(model, noise * grid[0], torch.tensor(grid, dtype=torch.float64), "euler")


def test_two_rounds_stay_close_to_the_teacher(toy: dict[str, str]) -> None:
    """8 -> 4 -> 2 steps: each student at N steps is far closer to its teacher at 2N steps than the teacher
    itself run at N steps (same initial noise). Measured: SW ratio ~0.02 per round (asserted < 0.25)."""
    teacher, _ = _load(toy["teacher"])
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5))
    teacher_grid = process_grid(teacher.process, 8).tolist()
    cfg = DistillConfig(updates=300, final_updates=300, batch_size=256, lr=1e-3)
    model, uri, grid = teacher, toy["teacher"], teacher_grid
    for r in range(2):
        ctx = StageContext(toy["root"], f"round{r}", key=f"round{r}")
        res = distill(cfg, uri, len(grid) - 1, toy["dataset"], r, ctx)
        student, spec = _load(res.outputs["model"])
        half = res.info["sigmas"]
        assert half == grid[::2] and res.info["steps"] == spec["steps"] == len(grid) // 2
        assert spec["sigmas"] == half and spec["sampler"] == "euler"
        assert res.metrics["updates"] == 300

        reference = _euler(model, noise, grid)
        sw_student = sliced_wasserstein(_euler(student, noise, half), reference)
        sw_teacher = sliced_wasserstein(_euler(model, noise, half), reference)
        assert sw_student < 0.25 * sw_teacher, (r, sw_student, sw_teacher)
        model, uri, grid = student, res.outputs["model"], half

    # And the 2-step student against the original 8-step teacher, next to that teacher at 2 steps.
    reference = _euler(teacher, noise, teacher_grid)
    sw_student = sliced_wasserstein(_euler(model, noise, grid), reference)
    sw_teacher = sliced_wasserstein(
        _euler(teacher, noise, process_grid(teacher.process, 2).tolist()), reference
    )
    assert sw_student < 0.25 * sw_teacher, (sw_student, sw_teacher)


class _Crash(RuntimeError):
    pass


def test_round_resumes_from_its_checkpoint(toy: dict[str, str]) -> None:
    cfg = DistillConfig(updates=30, batch_size=64, lr=1e-3, checkpoint_every=10, log_every=5)
    logged: list[tuple[int, float]] = []

    def crash_after_25(metrics: dict[str, float], step: int) -> None:
        logged.append((step, metrics["distill/lr"]))
        if step == 25:
            raise _Crash

    ctx = StageContext(toy["root"], "resumed", key="resumed", log_metrics=crash_after_25)
    with pytest.raises(_Crash):
        distill(cfg, toy["teacher"], 8, toy["dataset"], 0, ctx)
    assert [s for s, _ in logged] == [5, 10, 15, 20, 25]
    assert not Path(toy["root"], "resumed").exists()  # nothing reaches the store before the stage ends
    checkpoints = Path(toy["root"], "checkpoints", "distill_round", "resumed")
    assert (checkpoints / "step-000000020" / MANIFEST_NAME).exists()

    logged.clear()
    ctx.log_metrics = lambda metrics, step: logged.append((step, metrics["distill/lr"]))
    res = distill(cfg, toy["teacher"], 8, toy["dataset"], 0, ctx)
    assert res.metrics["resumed_from"] == 20
    assert res.metrics["updates"] == 30
    assert [s for s, _ in logged] == [25, 30]  # continues the step counter, not from 0
    # ... and the learning-rate schedule: lr_k = lr (1 - k/updates) on step k + 1.
    assert [lr for _, lr in logged] == pytest.approx([1e-3 * (1 - 24 / 30), 1e-3 * (1 - 29 / 30)])
    manifest = json.loads(Path(toy["root"], "resumed", MANIFEST_NAME).read_text())
    assert manifest["result"]["metrics"]["updates"] == 30  # the result is covered by the manifest
    assert not checkpoints.exists()  # a complete stage keeps no training checkpoints


@pytest.mark.parametrize(
    ("name", "fdm", "parameterisation"), [("vp", True, "v"), ("ve", True, "x"), ("edm", False, "v")]
)
def test_round_runs_for_any_process(
    tmp_path: Path, toy: dict[str, str], name: str, fdm: bool, parameterisation: str
) -> None:
    """Mechanics for VP/VE/EDM teachers, FDM or not: the student keeps the process (FDM's c_in included),
    takes the chosen head, records its grid, reloads and samples; it refuses being distilled off its grid."""
    teacher = Denoiser(MLP(2, hidden=16, depth=1), make_process(name, fdm=fdm))
    uri = write_model(open_store(str(tmp_path)), "teacher", teacher, model_spec(teacher, data_shape=[2]), {})
    grid = process_grid(teacher.process, 4).tolist()
    cfg = DistillConfig(updates=2, batch_size=16, parameterisation=parameterisation)
    res = distill(cfg, uri, 4, toy["dataset"], 0, StageContext(str(tmp_path), "s1"))
    student, spec = _load(res.outputs["model"])
    assert spec["process"]["name"] == name and spec["process"]["fdm"] == fdm
    assert student.head == ("precond" if parameterisation == "x" else parameterisation)
    assert spec["steps"] == 2 and spec["sigmas"] == grid[::2]
    out = _euler(student, torch.randn(8, 2), spec["sigmas"])
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"teacher_steps: .* was distilled for a 2-step grid"):
        distill(cfg, res.outputs["model"], 4, toy["dataset"], 1, StageContext(str(tmp_path), "s2"))


def test_students_of_fdm_see_their_input(tmp_path: Path, toy: dict[str, str]) -> None:
    """FDM scales the net input by gamma(80) ~ 4e-8: a student of an FDM teacher takes the baseline's c_in
    where gamma hides x (so a 1-step student, whose one step is D(x, 80), depends on its noise) and keeps
    FDM's gamma everywhere else; students of baseline teachers keep the teacher's process."""
    for name in ("edm", "vp", "ve"):
        assert student_process(make_process(name)) == make_process(name)
    fdm = make_process("edm", fdm=True)
    sighted, baseline = student_process(fdm), make_process("edm")
    sigma = torch.tensor([80.0, 60.0, 2.6, 0.5, 0.002], dtype=torch.float64)
    assert float(fdm.c_in(sigma[:1]) * 80) < 1e-5  # the teacher is blind at sigma_max
    torch.testing.assert_close(sighted.c_in(sigma[:1]), baseline.c_in(sigma[:1]))
    torch.testing.assert_close(sighted.c_in(sigma[2:]), fdm.c_in(sigma[2:]))  # where the teacher sees x

    teacher = Denoiser(MLP(2, hidden=16, depth=1), fdm)
    uri = write_model(open_store(str(tmp_path)), "teacher", teacher, model_spec(teacher, data_shape=[2]), {})
    cfg = DistillConfig(updates=3, checkpoint_every=10**6)
    two = distill(cfg, uri, 4, toy["dataset"], 1, StageContext(str(tmp_path), "s2"))
    one = distill(cfg, two.outputs["model"], 2, toy["dataset"], 2, StageContext(str(tmp_path), "s1"))
    student, spec = _load(one.outputs["model"])
    assert spec["process"]["fdm"] and spec["process"]["see_input"] and spec["steps"] == 1
    assert student.process == sighted
    samples = _euler(student, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), spec["sigmas"])
    assert float(samples.std(dim=0).min()) > 1e-3  # not one point: the samples depend on their noise
