"""``torch.nn.Module`` wrappers of the contrastgen losses (``contrastgen.nn.ClipLoss`` ...)."""
from .losses import (AttentionNCELoss, ClipLoss, DispersiveLoss, InfoNCELoss, LogitScale, NTXentLoss, PatchNCELoss,
                     SigLipLoss, UniformityLoss)

__all__ = ["AttentionNCELoss", "ClipLoss", "DispersiveLoss", "InfoNCELoss", "LogitScale", "NTXentLoss", "PatchNCELoss",
           "SigLipLoss", "UniformityLoss"]
