"""Deployment and inspection tools: ONNX/torch.export, offline downloads, the model zoo, Hub folders, plots."""
