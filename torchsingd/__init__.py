"""torchsingd."""
