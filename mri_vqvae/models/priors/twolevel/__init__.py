"""Two-level prior: a coarse grid of code clusters, then the codes given it."""
