"""`fdm sample`: draw samples from a model artifact, sequentially or by ParaDiGMS Picard windows.

    fdm sample --checkpoint REF --sampler ddpm --steps 1000 --num 16 --seed 0 \\
        [--picard --window 64 --tol 0.1 --actors 2] --out samples.npz

REF is a model artifact (local directory or s3://bucket/prefix), or an MLflow model (`models:/NAME@alias`,
`models:/NAME/VERSION`, `runs:/RUN_ID`) from `--tracking-uri`. The same seed gives the sequential and
the Picard sampler the same noise, so `--compare` reports how far Picard lands from the sequential result.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from tasks.sample_options import PicardPoolOptions, SampleConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `sample` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "sample",
        help="sample a model artifact (sequential or ParaDiGMS Picard)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="model artifact (local dir, s3://bucket/prefix) or MLflow model (models:/NAME@alias, runs:/ID)",
    )
    p.add_argument(
        "--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI for models:/ and runs:/"
    )
    add_model_flags(p, SampleConfig, {"Picard (with --picard)": PicardPoolOptions})
    p.add_argument("--ray-address", help="join this Ray cluster (default: start one on 127.0.0.1)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: FDM_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default="samples.npz", help="output .npz (default samples.npz)")
    return p


def add_model_flags(
    p: argparse.ArgumentParser, model: type[BaseModel], groups: dict[str, type[BaseModel]]
) -> None:
    """One flag per field of `model` (`--actor-cpus` for `actor_cpus`): a bool is a switch, a Literal gives
    the choices, the description is the help with the default; a value is checked against the field's own
    type and bounds, so a bad one is an error naming its flag. Fields of a base model in `groups` get that
    titled group."""
    titled = {title: p.add_argument_group(title) for title in groups}
    home = {name: titled[t] for t, base in groups.items() for name in base.model_fields}
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] in home)  # ungrouped flags first
    for name, info in fields:
        where = home.get(name, p)
        flag = "--" + name.replace("_", "-")
        shown = "" if info.default is None or info.default is False else f" (default {info.default})"
        text = f"{info.description}{shown}"
        kind = info.annotation
        if get_origin(kind) in (Union, UnionType):  # optional: the flag is simply left out
            kind = next(a for a in get_args(kind) if a is not type(None))
        if kind is bool:
            where.add_argument(flag, action="store_true", help=text)
        elif get_origin(kind) is Literal:
            where.add_argument(flag, choices=get_args(kind), default=info.default, help=text)
        else:
            where.add_argument(flag, type=_field_parser(kind, info.metadata), default=info.default, help=text)


def _field_parser(kind: type, metadata: list[Any]) -> Any:
    """Parse a flag's text as the field's type within its bounds; argparse names the flag on an error."""
    bounded = Annotated[(kind, *metadata)] if metadata else kind
    adapter = TypeAdapter(bounded, config=ConfigDict(allow_inf_nan=False))

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as err:
            raise argparse.ArgumentTypeError(f"{err.errors()[0]['msg']} (got {text!r})") from None

    return parse


def _flag_errors(err: ValidationError) -> str:
    """A config error in the flags' names: `--window: ...`, or the message alone for a cross-field one."""
    return "; ".join(
        ", ".join("--" + str(part).replace("_", "-") for part in e["loc"]) + ": " + e["msg"]
        if e["loc"]
        else e["msg"].removeprefix("Value error, ")
        for e in err.errors()
    )


def run(args: argparse.Namespace) -> int:
    """Sample, write `--out`, print the cost. Exit codes as `fdm`: 0 ok, 2 bad input, 1 sampling failed."""
    import ray
    import torch

    from infra.ray_runtime import init_ray
    from infra.store import S3Settings, StoreError
    from tasks.sample import draw_samples, samples_npz

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        checkpoint = args.checkpoint
        if checkpoint.startswith(("models:/", "runs:/")):
            from mlflow.exceptions import MlflowException

            from infra.mlflow_models import local_model_dir
            from infra.tracking import existing_store

            try:
                checkpoint = local_model_dir(checkpoint, existing_store(args.tracking_uri))
            except (MlflowException, OSError) as err:
                raise StoreError(f"{args.checkpoint}: {str(err).splitlines()[0]}") from None
        try:
            cfg = SampleConfig(**{name: getattr(args, name) for name in SampleConfig.model_fields})
        except ValidationError as err:
            raise ValueError(_flag_errors(err)) from None
        started = (
            cfg.picard and cfg.actors > 0 and init_ray(args.ray_address, max(os.cpu_count() or 1, cfg.actors))
        )
        try:
            samples, stats = draw_samples(cfg, checkpoint, S3Settings(args.endpoint_url), device)
        finally:
            if started:
                ray.shutdown()
        Path(args.out).write_bytes(samples_npz(samples, stats))
    except (StoreError, ValueError, LookupError) as err:  # a bad reference, artifact or option
        print(f"fdm sample: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ray.exceptions.RayError) as err:  # the sampling itself failed
        print(f"fdm sample: failed: {err}", file=sys.stderr)
        return 1
    print(_summary(stats, list(samples.shape), args.out))
    return 0


def _summary(stats: dict[str, Any], shape: list[int], out: str) -> str:
    how = "sequential"
    if "window" in stats:
        where = f"{stats['actors']} Ray actors" if stats["actors"] else "local batched"
        how = f"Picard ({stats['solver']}) window {stats['window']}, tol {stats['tol']} ({where})"
    lines = [
        f"{stats['sampler']} {stats['steps']} steps, {how}: {shape[0]} samples of {shape[1:]}",
        f"parallel iterations {stats['parallel_iterations']}, model evaluations {stats['model_evaluations']}",
        f"wall {stats['wall_seconds']:.3f} s (setup {stats['setup_seconds']:.3f} s)",
    ]
    if "max_deviation" in stats:
        lines.append(
            f"sequential {stats['sequential_seconds']:.3f} s, speed-up {stats['speedup']:.2f}x "
            f"(median of {stats['pairs']} pairs, {stats['speedup_min']:.2f}-{stats['speedup_max']:.2f}x), "
            f"max deviation {stats['max_deviation']:.3g}"
        )
    lines.append(f"wrote {out}")
    return "\n".join(lines)
