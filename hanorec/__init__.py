"""HaNoRec Studio: multimodal-LLM sequential recommendation with SFT and HaNo-DPO."""

__version__ = "0.1.0"
