"""The prepare_data stage's declaration and config: a source dataset -> split, shuffled Parquet shards."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from tasks.stage import STRICT, StageKind

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class _Source(BaseModel):
    model_config = STRICT


class Toy2DSource(_Source):
    """A classic 2-D toy distribution (FFJORD's definitions), drawn with the config seed."""

    kind: Literal["toy2d"] = "toy2d"
    toy: Literal["eight_gaussians", "two_moons", "checkerboard", "swiss_roll"]
    n: int = Field(10_000, ge=2)


class DigitsSource(_Source):
    """scikit-learn's 1,797 real 8x8 digits (values 0..16), optionally zero-padded and/or resized."""

    kind: Literal["digits"] = "digits"
    pad_to: int | None = Field(None, ge=8)
    resize_to: int | None = Field(None, ge=1)


class ImageFolderSource(_Source):
    """Image files under `path`; with class sub-folders (path/<class>/img.png) the folder names are labels."""

    kind: Literal["image_folder"] = "image_folder"
    path: str = Field(min_length=1)
    mode: Literal["RGB", "L"] = "RGB"
    resize_to: int | None = Field(None, ge=1)


class Cifar10Source(_Source):
    """The CIFAR-10 python-pickle batches in directory `path` (dicts with b'data' [N, 3072] and b'labels')."""

    kind: Literal["cifar10"] = "cifar10"
    path: str = Field(min_length=1)
    batches: list[str] = Field(default_factory=lambda: list(CIFAR10_TRAIN_BATCHES), min_length=1)


class NpySource(_Source):
    """An .npy array [N, D], [N, H, W] or [N, C, H, W], or an .npz holding one (and optionally labels)."""

    kind: Literal["npy"] = "npy"
    path: str = Field(min_length=1)
    x_key: str = "x"
    labels_key: str | None = None
    # Mapped to [-1, 1]; None keeps floats as given and maps uint8 from [0, 255].
    value_range: tuple[float, float] | None = None

    @field_validator("value_range", mode="before")
    @classmethod
    def _pair(cls, v: object) -> object:
        """YAML and JSON give a list; strict mode takes only a tuple."""
        return tuple(v) if isinstance(v, list) else v

    @field_validator("value_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError("value_range must be (lo, hi) with lo < hi")
        return v


Source = Annotated[
    Toy2DSource | DigitsSource | ImageFolderSource | Cifar10Source | NpySource, Field(discriminator="kind")
]


class DataConfig(BaseModel):
    """Configuration of the prepare_data stage."""

    model_config = STRICT

    source: Source
    seed: int = 0
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    shard_rows: int = Field(8192, ge=1)
    row_group_rows: int = Field(1024, ge=1)


STAGE = StageKind(
    name="prepare_data",
    config=DataConfig,
    run="tasks.prepare_data:prepare_data",
    inputs={},
    output="dataset",
    resources="prepare_data",
    headline="n_train",
    version="3",
)
