"""Small reference models used by studies, tests and docs."""
from slt_tools.models.compat import vmappable_attention
from slt_tools.models.dln import DeepLinearNetwork
from slt_tools.models.mlp import ResidualMLP
from slt_tools.models.transformer import Transformer, TransformerConfig

__all__ = ["DeepLinearNetwork", "ResidualMLP", "Transformer", "TransformerConfig", "vmappable_attention"]
