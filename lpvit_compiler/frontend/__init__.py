"""Front end: capture a model as a canonical torch.fx graph, pick its prunable layers, read calibration data."""
