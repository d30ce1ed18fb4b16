"""The trainable model: label embeddings, the GNN graph encoder, the adapter of named branches (image and
graph) and the injection strategies that feed their tokens to the UNet; ``parameter_counts`` sizes them."""
