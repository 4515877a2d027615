"""Drop-in ops, registered as torch.ops.cdgfast.* (filled in as the op families land)."""
