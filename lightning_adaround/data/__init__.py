"""From calibration batches to what each unit needs: capture, carried block inputs, blocks, units, caches, moments."""
