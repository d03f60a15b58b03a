"""Fine-tuning STU-Net (the SegBook recipe): data, augmentation, loss, loop, checkpoints, DDP.

Entry point: `segbook.training.trainer.finetune(FinetuneConfig, reporter)`.
"""
