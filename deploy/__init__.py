"""WHAT ships: exports (compact, ONNX, INT8), one loader for every artefact, predict, evaluate, bench-infer."""
