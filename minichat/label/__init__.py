"""The human-feedback labeling app: demonstrations, rankings and ratings by labelers, exported as the
training files of SFT and the reward model (see docs/parts/label.md)."""
