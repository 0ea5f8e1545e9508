"""SynQT in JAX/Flax: frozen ViT image path, trainable query-synthesis path."""
