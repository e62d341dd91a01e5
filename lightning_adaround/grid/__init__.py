"""The grid and the rounding math: which integers a weight may take, the rounding variable, its regularizer."""
