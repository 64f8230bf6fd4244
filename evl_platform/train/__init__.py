"""Training: ``loop`` (plain PyTorch), ``state`` (checkpoints), ``worker`` (Ray Train worker)
and ``launcher`` (Ray Train + MLflow). Import the submodule you need: the launcher pulls in
Ray and MLflow, which the loop does not."""
