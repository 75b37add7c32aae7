"""Embedding bags for the table tests, and their plain pooled sums."""
import torch

# Bags used throughout (B = 4, bag 2 empty):
#   bag:        0            1       2      3
#   indices:  [0, 7, 7]    [12]     []    [3, 9]
INDICES = torch.tensor([0, 7, 7, 12, 3, 9])
OFFSETS = torch.tensor([0, 3, 4, 4])
WEIGHTS = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.5, 0.25])


def plain_bag_sum(table, indices, offsets, weights=None):
    """Sum of (weighted) rows per bag, a Python loop; table (n, d) -> (B, d)."""
    bounds = offsets.tolist() + [len(indices)]
    bags = []
    for b in range(len(offsets)):
        total = torch.zeros(table.shape[1], dtype=table.dtype)
        for pos in range(bounds[b], bounds[b + 1]):
            scale = 1.0 if weights is None else weights[pos]
            total = total + scale * table[int(indices[pos])]
        bags.append(total)
    return torch.stack(bags)
