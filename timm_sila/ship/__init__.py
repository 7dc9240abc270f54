"""Keeping one branch: `strip` / `load_stripped` / `branch_model` (`strip`), the hub model card (`card`, a pure
renderer), ONNX / .pt2 export (`export`), and opening what a user names (`load`)."""
