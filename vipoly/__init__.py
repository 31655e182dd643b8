"""vipoly."""
