"""minichat: ChatGPT end to end, small enough to read and to run on a laptop CPU."""

__version__ = "0.1.0"
