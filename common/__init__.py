"""Flower-free core of fedtransfer: config, data, backbones, heads, DP training, privacy."""
