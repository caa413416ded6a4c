"""theta*: full-batch L-BFGS + Newton and minibatch training, checkpoints, the model cache and the shipped models."""
