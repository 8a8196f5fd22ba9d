"""Region relationship reasoning block of VSRN (a non-local block over the 36 regions)."""

import torch
from torch import nn
from torch.nn import functional as F


class Rs_GCN(nn.Module):
    """v* = BN(W (R g(v))) + v with R = theta(v)^T phi(v) / N, all projections 1x1 convolutions.

    The BatchNorm's weight and bias start at zero, so a new block is the identity.
    """

    def __init__(self, in_channels, inter_channels):
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = inter_channels
        self.g = nn.Conv1d(in_channels, inter_channels, kernel_size=1)
        self.theta = nn.Conv1d(in_channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv1d(in_channels, inter_channels, kernel_size=1)
        self.W = nn.Sequential(nn.Conv1d(inter_channels, in_channels, kernel_size=1), nn.BatchNorm1d(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, v):
        """v: (batch, channels, regions) as the original; returns the same shape."""
        return self.forward_regions(v.transpose(1, 2)).transpose(1, 2)

    def forward_regions(self, x):
        """x: (batch, regions, channels). A 1x1 convolution is a linear map per region, so the
        block runs as matrix products on this layout without permuting between layers."""
        g = F.linear(x, self.g.weight.squeeze(-1), self.g.bias)
        theta = F.linear(x, self.theta.weight.squeeze(-1), self.theta.bias)
        phi = F.linear(x, self.phi.weight.squeeze(-1), self.phi.bias)
        relation = torch.matmul(theta, phi.transpose(1, 2)) / x.size(1)
        y = torch.matmul(relation, g)
        w_y = F.linear(y, self.W[0].weight.squeeze(-1), self.W[0].bias)
        w_y = self.W[1](w_y.transpose(1, 2)).transpose(1, 2)
        return w_y + x
