"""Model artifacts and resumable training checkpoints in the artifact store, as safetensors + JSON.

A model artifact (`model.json` + `weights.safetensors`) is what sampling and distillation load; a training
checkpoint adds the raw weights, optimizer, RNG and counters so a retried stage resumes where it stopped.
Both are complete only once their manifest is written; loading verifies sha256 and never unpickles.
"""

from __future__ import annotations

import json
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fdm_core.networks import build_network
from fdm_core.precond import Denoiser
from fdm_core.processes import Process
from fdm_core.training import EMA, TrainState
from infra.manifest import (
    current_version,
    is_complete,
    read_manifest,
    read_verified,
    seal_dir,
    write_manifest,
)
from infra.store import ArtifactStore

MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def model_spec(denoiser: Denoiser, **extra: Any) -> dict[str, Any]:
    """Everything needed to rebuild `denoiser` besides its weights (network, process, head, extras)."""
    p = denoiser.process
    return {
        "network": denoiser.net.config,
        "process": {
            "name": p.name,
            "sigma_min": p.sigma_min,
            "sigma_max": p.sigma_max,
            "sigma_data": p.sigma_data,
            "fdm": p.fdm,
            "multiplier": p.multiplier,
            "warmup_iters": p.warmup_iters,
            "see_input": p.see_input,
        },
        "head": denoiser.head,
        **extra,
    }


def build_denoiser(spec: dict[str, Any]) -> Denoiser:
    """A fresh (untrained) denoiser from a model spec."""
    return Denoiser(
        build_network(spec["network"]), Process(**spec["process"]), head=spec.get("head", "precond")
    )


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_model(out_dir: Path, weights: nn.Module, spec: dict[str, Any]) -> None:
    """Stage a model artifact (weights of `weights`, usually the EMA copy) in a local output directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / WEIGHTS).write_bytes(st_save(_weights(weights)))
    (out_dir / MODEL_JSON).write_bytes(json.dumps(spec, indent=2, sort_keys=True).encode())


def write_model(
    store: ArtifactStore, prefix: str, weights: nn.Module, spec: dict[str, Any], producer: dict[str, Any]
) -> str:
    """A complete model artifact in the store outside any stage (benchmarks, tests); returns its URI."""
    with tempfile.TemporaryDirectory(prefix="fdm-model-") as tmp:
        save_model(Path(tmp), weights, spec)
        seal_dir(store, tmp, prefix, producer)
    return store.uri(prefix)


def load_model(store: ArtifactStore, prefix: str, device: str = "cpu") -> tuple[Denoiser, dict[str, Any]]:
    """Rebuild and load a model artifact, refusing it if its manifest or any digest does not match;
    `prefix` is a version directory or a stage key's directory (its CURRENT version is loaded)."""
    prefix = current_version(store, prefix)
    manifest = read_manifest(store, prefix)
    spec = json.loads(read_verified(store, prefix, MODEL_JSON, manifest))
    denoiser = build_denoiser(spec)
    denoiser.load_state_dict(st_load(read_verified(store, prefix, WEIGHTS, manifest)))
    return denoiser.to(device).eval(), spec


# --- resumable training checkpoints ----------------------------------------------------------------
@dataclass
class TrainingCheckpoint:
    """What a resumed stage restores."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    state: TrainState
    rng: torch.Tensor
    extra: dict[str, Any]


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(
    store: ArtifactStore,
    root: str,
    model: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> str:
    """Write `root/step-NNNNNNNNN/` (manifest last), then prune all but the newest `keep` complete ones."""
    prefix = posixpath.join(root, f"step-{state.step:09d}")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    store.write_bytes(posixpath.join(prefix, "model.safetensors"), st_save(_weights(model)))
    if ema is not None:
        store.write_bytes(posixpath.join(prefix, "ema.safetensors"), st_save(_weights(ema.model)))
    store.write_bytes(posixpath.join(prefix, "optimizer.safetensors"), st_save(opt_tensors))
    store.write_bytes(posixpath.join(prefix, "rng.safetensors"), st_save({"cpu": torch.get_rng_state()}))
    meta = {"state": state.as_dict(), "optimizer": opt_meta, "extra": extra or {}}
    store.write_bytes(posixpath.join(prefix, "state.json"), json.dumps(meta, sort_keys=True).encode())
    write_manifest(store, prefix, {"kind": "training_checkpoint", "step": state.step})
    for old in _complete_steps(store, root)[:-keep]:
        store.delete_prefix(posixpath.join(root, f"step-{old:09d}"))
    return prefix


def _complete_steps(store: ArtifactStore, root: str) -> list[int]:
    steps = set()
    for path in store.list(root):
        rel = posixpath.relpath(path, root) if root else path
        m = _STEP_DIR.match(rel.split("/", 1)[0])
        if m:
            steps.add(int(m.group(1)))
    return sorted(s for s in steps if is_complete(store, posixpath.join(root, f"step-{s:09d}")))


def latest_training_checkpoint(store: ArtifactStore, root: str) -> TrainingCheckpoint | None:
    """The newest complete checkpoint under `root`, or None; incomplete or corrupt ones are skipped."""
    steps = _complete_steps(store, root)
    if not steps:
        return None
    prefix = posixpath.join(root, f"step-{steps[-1]:09d}")
    manifest = read_manifest(store, prefix)

    def tensors(name: str) -> dict[str, torch.Tensor]:
        return st_load(read_verified(store, prefix, name, manifest))

    meta = json.loads(read_verified(store, prefix, "state.json", manifest))
    return TrainingCheckpoint(
        step=meta["state"]["step"],
        model=tensors("model.safetensors"),
        ema=tensors("ema.safetensors") if "ema.safetensors" in manifest.files else None,
        optimizer=_unflatten_optimizer(tensors("optimizer.safetensors"), meta["optimizer"]),
        state=TrainState(**meta["state"]),
        rng=tensors("rng.safetensors")["cpu"],
        extra=meta["extra"],
    )


def resume_training(
    store: ArtifactStore,
    root: str,
    model: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> TrainState:
    """Continue from the newest complete checkpoint under `root` (schedule included), or start fresh."""
    ckpt = latest_training_checkpoint(store, root)
    if ckpt is None:
        return TrainState()
    state = restore(ckpt, model, ema, optimizer)
    if scheduler is not None:
        scheduler.last_epoch = state.step
    return state


def restore(
    ckpt: TrainingCheckpoint, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer
) -> TrainState:
    """Load a checkpoint into live objects; returns the restored counters."""
    model.load_state_dict(ckpt.model)
    if ema is not None and ckpt.ema is not None:
        ema.load_state_dict(ckpt.ema)
    optimizer.load_state_dict(ckpt.optimizer)
    torch.set_rng_state(ckpt.rng)
    return ckpt.state
