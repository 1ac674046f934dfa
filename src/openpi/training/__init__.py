"""Training utilities (small, CPU-sized): the control organisms and a flow-matching loop. Not imported by models."""
