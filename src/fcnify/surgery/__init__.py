"""Net surgery: rewrite InnerProduct as Convolution, transplant the weights, and check the result."""
