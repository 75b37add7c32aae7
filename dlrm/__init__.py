"""DLRM, the Deep Learning Recommendation Model benchmark: the code behind the root scripts.

    common       errors and Batch, shared by every part
    distributed  processes: set-up, table sharding, the all-to-all, rank agreement
    model/       the network, its tables and their fast paths
    kernels/     the C++ kernels (csrc/) and their build
    data/        random, synthetic and Criteo data (criteo/: preprocessing and loaders)
    run/         flags, configuration, the run, training loops, checkpoints
    outputs/     what a run writes besides its lines: metrics, TensorBoard, graph, ONNX, MLPerf
    io/          atomic files, npz streams, provenance records, path collisions
    optim/       optimizers and the learning-rate schedule
"""
