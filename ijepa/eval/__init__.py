"""Evaluation protocols around one feature core: linear-probe grid, k-NN, similarity search."""
