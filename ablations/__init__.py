"""Sweeps, W&B logging, the ablation dataframe and its exports, and the `ablate` CLI."""
