"""gvpo: Group Variance Policy Optimization (Zhang et al., arXiv 2504.19599) for causal language models."""

from gvpo.losses import LOSSES, astar_po_loss, dr_grpo_loss, gvpo_loss, grpo_loss

__all__ = ["LOSSES", "gvpo_loss", "grpo_loss", "dr_grpo_loss", "astar_po_loss"]
__version__ = "0.1.0"
