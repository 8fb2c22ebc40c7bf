"""Training stages: each module is a thin, linear entry point over the shared loop in loop.py."""
