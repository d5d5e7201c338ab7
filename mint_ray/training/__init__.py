"""Student training. The pure parts the trainer calls: ``batching`` (rows -> token
batches), ``packing`` (shared-prefix layout) and ``logprobs`` (forward -> per-pair
log-probabilities); the objectives are in ``mint_ray.losses``.
"""
