"""graph_prune: structured channel pruning of deployed CNN graphs."""
