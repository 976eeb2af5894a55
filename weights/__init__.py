"""Getting weights in place: the demo checkpoint, real BAGEL downloads, and verification of a model dir."""
