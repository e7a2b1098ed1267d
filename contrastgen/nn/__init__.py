"""``torch.nn.Module`` wrappers of the contrastgen losses (``contrastgen.nn.ClipLoss`` ...) and contrastive-training
building blocks (``LogitScale``, ``SupConLoss``, ``MoCoQueue``, ``MomentumEncoder``)."""
from .losses import (AttentionNCELoss, ClipLoss, DispersiveLoss, InfoNCELoss, LogitScale, NTXentLoss, PatchNCELoss,
                     SigLipLoss, UniformityLoss)
from .moco import MoCoQueue, MomentumEncoder, moco_momentum
from .supcon import SupConLoss

__all__ = ["AttentionNCELoss", "ClipLoss", "DispersiveLoss", "InfoNCELoss", "LogitScale", "NTXentLoss", "PatchNCELoss",
           "SigLipLoss", "UniformityLoss", "MoCoQueue", "MomentumEncoder", "moco_momentum", "SupConLoss"]
