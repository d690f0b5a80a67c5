"""What runs in the job images: prune, evaluate, serve, watch-drift. Imports torch/onnxruntime/alibi-detect lazily per command."""
