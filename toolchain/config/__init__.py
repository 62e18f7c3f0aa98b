"""What a run is configured from: schema.py (the one pydantic schema of recipes and model cards), catalog.py
(finding them by name), sources.py (turning a card into local weights), gguf_convert.py, and targets.py."""
