"""What a stage's headline says, in the console and in MLflow: the metric its declaration names, its value,
the verdict when that value says the method lost, and the units the UI does not show.

Torch-free: the driver, the executor and `fdm stages` read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CURVE = "_by_sampling_steps"  # the parent run's quality curve: `<metric>_by_sampling_steps`, step = steps

# The units of the metrics the stages log, by name (a trailing "*" matches any name with that start); the
# MLflow UI shows bare numbers, so each stage run's description lists these for its metrics.
UNITS = {
    "fd": "Fréchet distance in the evaluation classifier's features (lower is better)",
    "fid": "FID, Fréchet distance in Inception features (lower is better)",
    "sw": "sliced Wasserstein distance to held-out data, in data units (lower is better)",
    "quality": "the evaluation's headline distance, fid, else fd, else sw (lower is better)",
    "confidence": "the classifier's mean top probability on the samples (0 to 1)",
    "coverage": "the fraction of classes the samples hit (0 to 1)",
    "nfe": "network evaluations per sample",
    "seconds_per_sample": "seconds per sample",
    "speedup": "x: sequential seconds / parallel seconds; below 1 the parallel sampler was slower",
    "parallel_iterations": "Picard iterations (the parallel depth)",
    "model_evaluations": "network evaluations in all",
    "max_deviation": "largest |parallel - sequential| sample difference, in data units",
    "images_seen": "training samples drawn",
    "updates": "optimizer steps",
    "steps": "optimizer steps",
    "resumed_from": "optimizer step the stage resumed at (0: from scratch)",
    "workers": "data-parallel workers",
    "final_sampling_steps": "sampling steps of the final model",
    "*_ratio_to_base": "x: the final model's distance / the base model's (lower is better)",
    "*_seconds": "seconds",
    "*/loss": "training loss (per batch)",
    "*/lr": "learning rate",
}


def unit(name: str) -> str | None:
    """The unit (with a word on its meaning) of metric `name`, or None if it is not a known one."""
    plain = name.removeprefix("base/").removesuffix(CURVE)
    if plain in UNITS:
        return UNITS[plain]
    for pattern, text in UNITS.items():
        if pattern.startswith("*") and plain.endswith(pattern[1:]):
            return text
    return None


def lost(name: str, value: float) -> str | None:
    """The verdict when a headline says the method lost: a speed-up below 1 is a slow-down."""
    if name.startswith("speedup") and value < 1:
        return f"the method lost, {1 / value:.2f}x slower than the sequential baseline" if value > 0 else None
    return None


def headline_value(decl_headline: str, result: Any) -> tuple[str, float] | None:
    """The (name, value) of a result's headline metric: an evaluation's `quality` under the name of the
    metric behind it (fd, sw, fid); None when the result has none."""
    if result is None or result.info.get("skipped") or decl_headline not in result.metrics:
        return None
    name = result.info.get("metric_name", decl_headline) if decl_headline == "quality" else decl_headline
    return name, result.metrics[decl_headline]


def format_headline(name: str, value: float) -> str:
    """`name=value`, with the verdict when the value says the method lost."""
    verdict = lost(name, value)
    return f"{name}={value:.4g}" + (f" ({verdict})" if verdict else "")


def stage_note(stage: str, decl_headline: str, result: Any) -> str:
    """A stage run's MLflow description: its headline in words (with the verdict when the method lost) and
    the units of the metrics it logged."""
    found = headline_value(decl_headline, result)
    text = f"Stage `{stage}`."
    if found:
        name, value = found
        verdict = lost(name, value)
        text += f" Headline: {name} = {value:.4g}" + (f": below 1, {verdict}." if verdict else ".")
    return text + units_note(result.metrics)


def units_note(metrics: Mapping[str, float]) -> str:
    """The units of the known metrics in `metrics`, as a Markdown list (empty if none is known)."""
    lines = [f"- `{k}`: {unit(k)}" for k in sorted(metrics) if unit(k)]
    return "\n\nUnits:\n" + "\n".join(lines) if lines else ""
