"""Development tools beside the product: the simulated engine, the real engine's runner and its CPU plugin."""
