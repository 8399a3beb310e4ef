"""Analysis: attention similarity, interventions, heatmaps."""
