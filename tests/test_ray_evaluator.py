"""Picard windows on Ray actors that load a real model artifact, the picard_sample stage and `fdm sample`."""

import argparse
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from fdm_core.networks import MLP
from fdm_core.picard import parallel_sample
from fdm_core.precond import Denoiser
from fdm_core.processes import make_process
from fdm_core.samplers import get_sigmas, process_grid
from infra.manifest import is_complete
from infra.ray_evaluator import RayEvaluator
from infra.store import open_store
from pipelines import sample_cmd
from tasks.checkpoints import load_model, model_spec, write_model
from tasks.registry import STAGES
from tasks.sample import StepFactory, sampling_grid
from tasks.sample_options import SampleConfig
from tasks.stage import StageContext, run_stage
from tasks.stages.picard_sample import PicardSampleConfig

STEPS = 64


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny 2-D MLP denoiser artifact with non-trivial weights (the output layer starts at zero)."""
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, emb_dim=16)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    denoiser = Denoiser(net, make_process("edm", fdm=True))
    store = open_store(str(tmp_path_factory.mktemp("store")))
    return write_model(store, "models/toy", denoiser, model_spec(denoiser, data_shape=[2]), {"stage": "test"})


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    sigmas = get_sigmas("karras", STEPS, 0.002, 80.0)
    return torch.randn(4, 2, generator=torch.Generator().manual_seed(seed)) * 80.0, sigmas


def _picard(model_uri: str, evaluator=None, solver: str = "picard"):
    model, _ = load_model(open_store(model_uri), "")
    x, sigmas = _inputs()
    gen = torch.Generator().manual_seed(1)
    return parallel_sample(model, x, sigmas, "ddpm", 16, 0.1, gen, evaluator, solver)  # type: ignore[arg-type]


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_two_actors_give_the_local_result(ray_local: None, model_uri: str, solver: str) -> None:
    local, local_stats = _picard(model_uri, solver=solver)
    with RayEvaluator(StepFactory(model_uri), actors=2, num_cpus=1) as evaluator:
        assert len(set(evaluator.pids())) == 2
        # Each actor sets torch's threads to the CPUs it holds, and runs at the caller's priority where the
        # OS lets it (Ray starts workers at nice 15).
        me = os.getpriority(os.PRIO_PROCESS, 0)
        assert all(i["threads"] == 1 and me <= i["niceness"] <= 15 for i in evaluator.replica_info)
        out, stats = _picard(model_uri, evaluator, solver)
        times = evaluator.times
    # Chunked batches may round differently in fp32; the trajectory of windows is the same.
    torch.testing.assert_close(out, local, rtol=1e-5, atol=1e-5)
    assert stats.strides == local_stats.strides
    assert stats.model_evaluations == local_stats.model_evaluations
    # One call (one task per actor, one ray.get) per iteration; the actors' compute is part of the wait.
    assert times.calls == stats.parallel_iterations
    ms = times.per_call_ms()
    assert 0 < ms["compute"] <= ms["wait"] and ms["total"] >= ms["wait"]


def test_killed_actor_restarts_reloads_weights_and_the_result_is_unchanged(
    ray_local: None, model_uri: str
) -> None:
    with RayEvaluator(StepFactory(model_uri), actors=2) as evaluator:
        expected, _ = _picard(model_uri, evaluator)
        victim = evaluator.pids()[0]
        calls = 0

        def crashing(*args):
            nonlocal calls
            calls += 1
            if calls == 3:  # mid-run: the actor's process dies just before this window is evaluated
                os.kill(victim, signal.SIGKILL)
            return evaluator(*args)

        out, stats = _picard(model_uri, crashing)
        assert calls == stats.parallel_iterations > 3
        restarted = evaluator.pids()[0]
    assert restarted != victim  # a fresh process, which built its model from the store again
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_replica_that_cannot_load_its_model_fails_fast_and_frees_its_cpus(
    ray_local: None, model_uri: str, tmp_path: Path
) -> None:
    with pytest.raises(ray.exceptions.RayActorError, match="manifest"):
        RayEvaluator(StepFactory(str(tmp_path / "missing")), actors=2, max_restarts=0)
    with RayEvaluator(StepFactory(model_uri), actors=2) as evaluator:  # both CPUs were given back
        assert len(evaluator.pids()) == 2


def _run_cli(tmp_path: Path, name: str, *extra: str, model_uri: str) -> np.lib.npyio.NpzFile:
    parser = argparse.ArgumentParser(prog="fdm")
    sample_cmd.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / f"{name}.npz"
    argv = ["sample", "--checkpoint", model_uri, "--sampler", "ddpm", "--steps", str(STEPS)]
    args = parser.parse_args([*argv, "--num", "16", "--seed", "3", *extra, "--out", str(out)])
    assert sample_cmd.run(args) == 0
    return np.load(out)


def test_fdm_sample_sequential_and_picard_on_actors_agree(
    ray_local: None, model_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seq = _run_cli(tmp_path, "seq", model_uri=model_uri)
    par = _run_cli(
        tmp_path, "par", "--picard", "--window", "16", "--actors", "2", "--compare", model_uri=model_uri
    )
    printed = capsys.readouterr().out
    for npz in (seq, par):
        assert npz["samples"].shape == (16, 2) and tuple(npz["shape"]) == (16, 2)
        assert npz["samples"].dtype == np.float32
        assert np.abs(npz["samples"]).max() <= 1.0
    assert int(seq["parallel_iterations"]) == STEPS and int(seq["model_evaluations"]) == STEPS
    assert int(par["parallel_iterations"]) < STEPS and int(par["actors"]) == 2
    assert float(par["max_deviation"]) < 0.05
    np.testing.assert_allclose(par["samples"], seq["samples"], atol=0.05)
    assert "parallel iterations" in printed and "max deviation" in printed


def test_fdm_sample_reports_a_missing_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="fdm")
    sample_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["sample", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]
    )
    assert sample_cmd.run(args) == 2
    assert "manifest" in capsys.readouterr().err


def test_sample_config_refuses_picard_options_without_picard() -> None:
    with pytest.raises(ValueError, match="picard"):
        SampleConfig(actors=2)


def test_picard_sample_stage_on_actors_matches_sequential(
    ray_local: None, model_uri: str, tmp_path: Path
) -> None:
    """The pipeline stage: Picard on 2 actors holding the model, against the sequential sampler."""
    ctx = StageContext(store_uri=str(tmp_path), out_prefix="stages/picard_sample/k")
    cfg = PicardSampleConfig(sampler="ddpm", steps=STEPS, num=8, window=16, actors=2, actor_cpus=0.5)
    result = run_stage(STAGES["picard_sample"], cfg, ctx, model=model_uri)
    assert is_complete(open_store(str(tmp_path)), "stages/picard_sample/k")
    npz = np.load(Path(result.outputs["samples"]) / "samples.npz")
    assert npz["samples"].shape == (8, 2)
    m = result.metrics
    assert m["parallel_iterations"] == int(npz["parallel_iterations"]) < STEPS
    assert m["model_evaluations"] >= STEPS and m["speedup"] > 0
    # The headline is the median of 3 alternating pairs, logged with its spread and where an iteration went.
    assert m["pairs"] == 3 and m["speedup_min"] <= m["speedup"] <= m["speedup_max"]
    assert m["ms_per_iteration"] > 0 and m["ms_actor_compute"] > 0 and "ms_actor_overhead" in m
    assert m["max_deviation"] < 0.1  # tolerance 0.1 on data of scale ~1
    assert (Path(result.outputs["samples"]) / "samples.png").stat().st_size > 0


def test_sampling_grid_prefers_a_distilled_students_own_grid(model_uri: str) -> None:
    model, spec = load_model(open_store(model_uri), "")
    own = [80.0, 10.0, 1.0, 0.0]
    student = {**spec, "sigmas": own, "steps": 3}
    assert sampling_grid(student, model, None).tolist() == own
    assert sampling_grid(student, model, 3).tolist() == own
    torch.testing.assert_close(sampling_grid(student, model, 8), process_grid(model.process, 8))
    torch.testing.assert_close(sampling_grid(spec, model, 8), process_grid(model.process, 8))
