"""cmdeploy.train: ResNet-PSP model, real-CT data sets, the paper's training recipe, checkpoints (torch)."""
