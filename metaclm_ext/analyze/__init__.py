"""The synthetic-data analyses of Sections 5 and 8.1 over a trained run's checkpoints; `metaclm analyze`.

attention (Figures 3/10, streaming the recorded history through history_topk), clustering (Figures 1/9),
inner loss (Figures 2/11, the logit lens of metaclm_ext.probe), norm trajectories (Figure 6), and the
paper's qualitative claims judged on the numbers (claims).
"""
from .run import AnalyzeConfig, analyze_run

__all__ = ["AnalyzeConfig", "analyze_run"]
