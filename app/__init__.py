"""The HaNoRec Studio explorer (Gradio): `python app/main.py`."""
