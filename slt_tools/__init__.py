"""slt_tools: singular learning theory tools for PyTorch."""
__version__ = "0.1.0"
