"""Studies built on the framework: the shapes evidence experiment and the encoder probes."""
