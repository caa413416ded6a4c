"""Models as functions of a flat parameter vector: MLPs, logistic regression, CNNs, initial weights."""
