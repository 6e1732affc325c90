"""The denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) that wraps a raw network F.

Every sampler, loss and distillation target talks to this one convention: `D(x, sigma) -> x0_hat` with
a per-sample `sigma` of shape [batch].
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fdm_core.processes import Process
from fdm_core.targets import head_coefficients
from fdm_core.tensors import append_dims

Head = Literal["precond", "x", "eps", "v"]


class Denoiser(nn.Module):
    """Preconditioned x0-estimator. `head='precond'` uses the process's c_skip/c_out; x/eps/v swap the output
    head (used when a distillation student changes parameterisation); c_in and c_noise always stay the
    process's, so FDM's gamma(sigma) input scaling is kept."""

    def __init__(self, net: nn.Module, process: Process, head: Head = "precond") -> None:
        super().__init__()
        self.net = net
        self.process = process
        self.head = head

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        p = self.process
        if self.head == "precond":
            c_skip, c_out = p.c_skip(sigma), p.c_out(sigma)
        else:
            c_skip, c_out = head_coefficients(self.head, sigma)
        c_in = p.c_in(sigma)
        x32 = x.to(torch.float32)
        f = self.net(append_dims(c_in, x32) * x32, p.c_noise(sigma))
        return append_dims(c_skip, x32) * x32 + append_dims(c_out, x32) * f.to(torch.float32)
