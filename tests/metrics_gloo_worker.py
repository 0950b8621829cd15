"""One rank of tests/test_metrics.py's 2-process Gloo test (run by torch.distributed.run).

Every rank makes the same features, takes its shard (``rank::world``), feeds it to
FeatureStats in uneven batches and all-reduces; rank 0 writes the statistics to ``argv[1]``.
"""

import os
import sys

import numpy as np
import torch


def make_features(n: int = 61, dim: int = 5) -> np.ndarray:
    """Correlated features with a large common offset (the hard case for raw-moment sums)."""
    rng = np.random.default_rng(123)
    return rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + 50.0


def main(out_path: str) -> None:
    from edm2fast.metrics import FeatureStats
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    feats = make_features()[rank::world]
    stats = FeatureStats(feats.shape[1])
    cuts = [0, 1, 4, 11, len(feats)] if rank == 0 else [0, 9, 10, len(feats)]  # uneven, different per rank
    for a, b in zip(cuts[:-1], cuts[1:]):
        stats.append(torch.from_numpy(feats[a:b]))
    stats.all_reduce()
    if rank == 0:
        mu, sigma = stats.mean_cov()
        np.savez(out_path, mu=mu, sigma=sigma, num=stats.num, world=world)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    main(sys.argv[1])
