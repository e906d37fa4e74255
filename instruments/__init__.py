"""What the tests and the benchmarks measure the code with, without a GPU: the launch / sync / byte
ledger of the CUDA path (ledger), a stand-in CUDA-graph capture (graph_tape), a training step's
FLOPs (flops). Development tools beside the package, never shipped with it."""
