"""How a rank gets a block's weights: the provider seam, a rank's buffers, and the resident, ZeRO-3 and series
providers."""
