"""Lightning glue: the callback, its arguments, where its calibration data come from, what it logs."""
