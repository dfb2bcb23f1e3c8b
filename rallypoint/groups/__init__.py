"""Process groups built from a plan: world, TP, PP, DP and EP, each its own object per generation."""
