"""The math, as pure tensor functions. Nothing here imports Lightning or the rest of the package."""
