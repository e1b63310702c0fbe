"""flowertune-qc: a FlowerTune-shaped federated LoRA fine-tune with fedqc's quality control."""
