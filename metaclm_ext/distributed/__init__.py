"""The history operators over a history split across the ranks of a torch.distributed process group.

Each rank holds a part of the history rows (a tensor, a row range of a store, or its own store) and
streams it with the single-process merge operators, its rows numbered from its global offset; only the
small merge states travel (docs/distributed.md). Launch with torchrun; gloo on CPU, NCCL on GPU.
"""
from .dual_form import dual_form_apply
from .group import DistributedHistoryError, collective
from .label_mass import history_label_mass
from .rank_stores import RankStores, open_ranks
from .split import split_store
from .topk import history_topk

__all__ = ["DistributedHistoryError", "RankStores", "collective", "dual_form_apply", "history_label_mass",
           "history_topk", "open_ranks", "split_store"]
