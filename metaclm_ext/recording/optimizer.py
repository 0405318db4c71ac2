"""What the optimizer will do to a recorded weight at this step: its learning rate, and whether the update
is exactly ``-lr * grad`` (plain SGD), the case in which the recorded errors sum to the weight change."""
from __future__ import annotations

from typing import Optional

import torch


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers such as accelerate's ``AcceleratedOptimizer`` (the Trainer's)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def param_groups_by_id(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """{id(parameter): the param group that holds it}."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def learning_rate(group: dict) -> float:
    """The group's current learning rate (a tensor for some schedules and capturable optimizers)."""
    lr = group["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def not_plain_sgd(optimizer: torch.optim.Optimizer, group: dict) -> Optional[str]:
    """None if the group's update is ``p -= lr * p.grad``; otherwise why not."""
    if type(optimizer) is not torch.optim.SGD:
        return f"the optimizer is {type(optimizer).__name__}, not plain SGD"
    options = {"momentum": group.get("momentum", 0), "weight_decay": group.get("weight_decay", 0),
               "nesterov": group.get("nesterov", False), "maximize": group.get("maximize", False)}
    used = [f"{k}={v}" for k, v in options.items() if v]
    return f"SGD with {', '.join(used)} is not plain SGD" if used else None
