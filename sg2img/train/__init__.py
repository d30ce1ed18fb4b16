"""Training: the adapter's and the base's LightningModules, their callbacks, atomic checkpoints, the
LightningCLI front end and the offline W&B run reader."""
