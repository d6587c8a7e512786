"""How good an SAE is: core metrics with the SAE spliced into its model (core), and the studies that ask whether
its latents are the right features."""
