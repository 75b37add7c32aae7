"""What a run writes besides its printed lines: metrics, TensorBoard, profiles, graph, ONNX and MLPerf events."""
