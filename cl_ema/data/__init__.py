"""Datasets → Avalanche streams of sample indices, with the tensors resident on the device.

``sources``: the datasets (torch only); ``storage``: tensors on the device and what a model knows of its
inputs (torch only); ``stream``: Avalanche's tasks over them; ``loader``: Avalanche's batches as gathers.
"""
