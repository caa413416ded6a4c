"""Per-sample gradients, Hessian / Gauss-Newton products and matrices, Lanczos, K-FAC factors, linear fast paths."""
