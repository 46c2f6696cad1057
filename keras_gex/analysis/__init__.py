"""Analysis of the loss deviations: detect, report, threshold, relabel, influence, prune, clean."""
