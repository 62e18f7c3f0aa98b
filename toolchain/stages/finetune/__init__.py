"""Stage 1, fine-tuning: decoder.py (LoRA, QLoRA, DoRA, rsLoRA, full; single process or DeepSpeed ranks) and
encoder.py (LoRA plus a task head). methods.py maps a recipe's method onto PEFT, batching.py decides what each step
trains on, checkpoint.py resumes, distributed.py and worker.py run the ranks."""
