"""The torch / Hugging Face side shared by the stages: loading models safely (models.py), a recipe's data
tokenized (data.py), torch scoring on the held-out split (evaluate.py) and encoder heads (encoder.py)."""
