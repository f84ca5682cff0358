"""Models: frozen backbones and their feature cache, heads and their (DP) training,
distilled students, model files and export, prediction and the shipped decision rule.
"""
