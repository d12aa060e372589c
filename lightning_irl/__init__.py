"""lightning_irl: align language models from demonstrations alone.

Supervised fine-tuning is inverse RL with a forward-KL objective; this package adds the
mode-seeking alternatives (reverse KL, Jensen-Shannon, f-divergences through a discriminator,
SPIN, IQ-Learn, generalized JSD) on PyTorch Lightning.
"""

__version__ = "0.1.0"
