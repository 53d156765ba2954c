"""Training: SFT (stage 1) and preference training (stage 2) on one shared loop."""
