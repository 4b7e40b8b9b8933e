"""Training: the state pytree, optimisation, the pure step and the loop (docs/design.md, "Training")."""
