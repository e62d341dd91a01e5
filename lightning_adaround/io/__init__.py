"""What leaves the process: export, ONNX, resumable checkpoints, the report figure."""
