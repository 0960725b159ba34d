"""Federated delta tuning: data partitions, payloads, server-side validation and FedAvg.

``partition``: IID and Dirichlet label-skew splits. ``payload``: which tensors travel per
method and their safetensors bytes. ``aggregate``: validation and example-weighted FedAvg.
``flower``: the Flower client and strategy built on them. ``tasks``: the data sets.
``run``: the in-process loop; ``process``: gRPC processes; ``simulation``: Flower's
simulation engine (Ray).
"""
