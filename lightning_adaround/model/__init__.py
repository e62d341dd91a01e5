"""Facts about the model and its preparation: supported layers, the graph walk, folding, equalization, bias correction."""
