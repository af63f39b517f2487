"""The trainer: DeepSpeed ZeRO fine-tuning on example records with SFT, DFT and importance-weighted losses."""
