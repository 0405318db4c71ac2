"""Probing pretrained causal LMs offline (paper Sections 6, 8.1, Appendix B); `metaclm probe`."""
from .cli import add_parser

__all__ = ["add_parser"]
