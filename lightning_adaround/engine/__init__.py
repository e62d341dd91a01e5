"""The run: objectives, the optimiser loop, the unit loop, and the reducer where processes meet."""
