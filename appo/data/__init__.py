"""Datasets: the internal record, loaders for real formats, the synthetic generator, frames."""
