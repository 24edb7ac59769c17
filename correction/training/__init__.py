"""Training: offline pretraining, the emulator and online fine-tuning.

Nothing under ``correction.training`` is imported by the service.
"""
