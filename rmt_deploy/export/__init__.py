"""Export: checkpoint -> validated ONNX step graph(s) and a manifest."""
