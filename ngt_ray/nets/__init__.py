"""The networks: staged backbones, group-testing models, checkpoints, runtime levers, decoding to pixels, profiling."""
