"""The evaluation's standard-FID path: a user-supplied TorchScript feature extractor, fed as EDM's fid.py."""

from pathlib import Path

import torch
from torch import Tensor, nn

from tasks.evaluate import _inception_features


class TinyInception(nn.Module):
    """Stands in for the user's Inception file: same call convention (uint8 NCHW RGB, return_features)."""

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        feats = x.float().mean(dim=(2, 3))
        return feats if return_features else feats.sum(1)


def test_inception_features_from_a_local_torchscript_file(tmp_path: Path) -> None:
    path = tmp_path / "inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    gray = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 1, 8, 8)
    feats = _inception_features(str(path), gray)
    assert feats.shape == (5, 3) and feats.dtype == torch.float64
    expected = ((gray[:, 0, 0, 0] + 1) * 127.5).round()
    assert torch.allclose(feats[:, 0], expected.double()) and torch.equal(feats[:, 0], feats[:, 2])
