"""Training scripts and the library code they share (loop, checkpoints, EMA, losses, validation), run with
``accelerate launch -m gen_sr.training.train_autoencoder`` and ``-m gen_sr.training.train_diffusion``."""
