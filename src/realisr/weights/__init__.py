"""Weights: the user cache, conversion of foreign formats (ncnn, official .pkl) and safe loading."""
