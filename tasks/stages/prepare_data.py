"""The prepare_data stage's declaration and config: a source dataset -> split, shuffled Parquet shards.

Image folders, CIFAR batches, .npy/.npz arrays and Parquet sources stream through Ray Data (read, decode
and validate on the cluster's nodes, memory bounded by `memory_budget_mb` and a spill to local disk);
the generated toy2d and the packaged digits sources are built in the stage's own process."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from tasks.stage import STRICT, AutoNode, StageKind

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _pair(v: object) -> object:
    """YAML and JSON give a list; strict mode takes only a tuple."""
    return tuple(v) if isinstance(v, list) else v


def _ordered(v: tuple[float, float] | None) -> tuple[float, float] | None:
    if v is not None and not v[0] < v[1]:
        raise ValueError("value_range must be (lo, hi) with lo < hi")
    return v


ValueRange = Annotated[tuple[float, float] | None, BeforeValidator(_pair), AfterValidator(_ordered)]


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
    value_range: ValueRange = None


class ParquetSource(_Source):
    """A .parquet file, or a folder of them (`_`/`.` sidecars skipped), with one sample per row: column
    `x_column` holds encoded images (binary, or a struct with `bytes` as Hugging Face writes) decoded like an
    image folder's, or a list of numbers reshaped to `shape`; `label_column` (optional) holds int labels."""

    kind: Literal["parquet"] = "parquet"
    path: str = Field(min_length=1)
    x_column: str = "x"
    label_column: str | None = None
    mode: Literal["RGB", "L"] = Field("RGB", description="encoded images only")
    resize_to: int | None = Field(None, ge=1, description="encoded images only")
    shape: list[int] | None = Field(None, min_length=1, description="numbers only; default [len(row)]")
    # Mapped to [-1, 1]; None keeps floats as given and maps uint8 from [0, 255] (numbers only).
    value_range: ValueRange = None


Source = Annotated[
    Toy2DSource | DigitsSource | ImageFolderSource | Cifar10Source | NpySource | ParquetSource,
    Field(discriminator="kind"),
]
RAY_DATA_KINDS = frozenset({"image_folder", "cifar10", "npy", "parquet"})


class DataConfig(BaseModel):
    """Configuration of the prepare_data stage.

    File sources (image_folder, cifar10, npy, parquet; a local path or an s3:// URI) stream through Ray
    Data: read, decoded and validated by tasks spread over the cluster's nodes, with at most
    `memory_budget_mb` of decoded blocks in flight. The stage spills the rows to local disk (about the
    dataset's stored size) by a seeded hash of each sample's id and writes each split in hash order, so
    besides Ray Data's own processes (about 1 GB of imports on 2 CPUs, whatever the data) it holds one
    spill bucket (1/256 of the dataset) and about six shards' worth of `shard_rows` samples at a time. Images
    are stored as uint8 and normalised by the loader as it reads; float sources as float32. toy2d and
    digits are built in the stage's own process."""

    model_config = STRICT

    source: Source
    seed: int = Field(0, description="seeds the hash of each sample's path or index: split and row order")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="val: the round(n * val_fraction) samples with the smallest hashes"
    )
    shard_rows: int = Field(8192, ge=1, description="samples per Parquet shard")
    row_group_rows: int = Field(1024, ge=1, description="samples per Parquet row group")
    block_rows: int | None = Field(
        None,
        ge=1,
        description="samples per Ray Data read task (files of an image folder, rows of an array); "
        "default: about 4 MiB of decoded samples, 16 to 8192",
    )
    memory_budget_mb: int = Field(
        256, ge=16, description="Ray Data's object-store budget for decoded blocks in flight, in MiB"
    )


STAGE = StageKind(
    name="prepare_data",
    config=DataConfig,
    run="tasks.prepare_data:prepare_data",
    inputs={},
    output="dataset",
    resources="prepare_data",
    auto=AutoNode("data", "the dataset and how it is prepared", provides="dataset", required=True),
    headline="n_train",
    version="5",
    # Ray Data's tasks hold the CPUs; the stage's own task only coordinates them and writes the shards.
    coordinates=lambda cfg: cfg.source.kind in RAY_DATA_KINDS,
)
