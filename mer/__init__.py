"""Library of the micro-expression recognition pipeline: dataset readers, face finding, metrics, I/O."""
