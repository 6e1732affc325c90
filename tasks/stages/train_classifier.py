"""The train_classifier stage's declaration and config: the small CNN whose features judge image samples."""

from __future__ import annotations

from pydantic import BaseModel, Field

from tasks.stage import STRICT, AutoNode, StageKind


class ClassifierConfig(BaseModel):
    """Training of the evaluation classifier."""

    model_config = STRICT
    steps: int = Field(400, ge=1, description="optimizer steps (cosine-annealed learning rate)")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, ge=4, description="channels of the first convolution")
    feature_dim: int = Field(64, ge=2, description="size of the feature layer the Fréchet distance uses")
    noise_std: float = Field(
        0.1, ge=0, description="input noise augmentation, so samples near the data classify"
    )
    seed: int = 0


STAGE = StageKind(
    name="train_classifier",
    config=ClassifierConfig,
    run="tasks.train_classifier:train_classifier",
    inputs={"dataset": "dataset"},
    output="classifier",
    resources="train",
    default_resources=(2.0, 1.0),
    # Labelled image data gets an evaluation classifier; 2-D toy data is judged by sliced Wasserstein.
    auto=AutoNode(
        "classifier",
        description="the classifier whose features judge image samples (not trained for toy2d data)",
        provides="classifier",
        default=ClassifierConfig,
        when=lambda cfg: cfg.data.source.kind != "toy2d",
    ),
    headline="val_accuracy",
    version="2",
    total_steps=lambda cfg: cfg.steps,
)
