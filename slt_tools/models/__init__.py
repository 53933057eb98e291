"""Small reference models used by studies, tests and docs."""
from slt_tools.models.dln import DeepLinearNetwork

__all__ = ["DeepLinearNetwork"]
