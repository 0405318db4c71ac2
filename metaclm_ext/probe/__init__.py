"""Probing pretrained causal LMs offline (paper Sections 6, 8.1, Appendix B); `metaclm probe`."""
