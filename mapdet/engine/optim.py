"""Optimizer and learning-rate schedule, both counted in optimizer steps.

The schedule is a ``LambdaLR`` stepped once per optimizer step by the training loop and never
passed through ``accelerator.prepare`` (a prepared scheduler steps ``num_processes`` times per
call), so warmup and milestones land on the same step for any world size. ``lr`` is the rate for
the global batch the config was written for; mapdet does not rescale it with the world size.
"""

from __future__ import annotations

import math

import torch

from mapdet.config import CHOICES, OptimConfig


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r} is unknown; choose one of {' | '.join(CHOICES['optim.name'])}")


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based): linear warmup, then decay."""
    warm = 1.0
    if step < cfg.warmup_steps:
        alpha = step / max(cfg.warmup_steps, 1)
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.schedule == "multistep":
        passed = sum(step >= round(m * max_steps) for m in cfg.milestones)
        return warm * cfg.gamma**passed
    if cfg.schedule == "cosine":
        progress = min(step / max(max_steps, 1), 1.0)
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(
        f"optim.schedule={cfg.schedule!r} is unknown; choose one of {' | '.join(CHOICES['optim.schedule'])}"
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """``cfg.milestones`` are shares of ``max_steps`` (in (0, 1): ``config.RANGES``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
