"""learn: sparsity that is learned during training (L0 hard-concrete block gates)."""
