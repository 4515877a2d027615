"""Naive references shared by several test files: one backward per sample, nothing clever."""
import torch


def per_sample_gradient_rows(model, loss_fn, batches, params):
    """G [N, P]: row i is the gradient of sample i's loss `loss_fn(model, batch_of_one).sum()` over
    `params`, for dict batches (every value's first dim is the sample)."""
    rows = []
    for b in batches:
        for i in range(b["x"].shape[0]):
            one = {k: v[i:i + 1] for k, v in b.items()}
            grads = torch.autograd.grad(loss_fn(model, one).sum(), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)
