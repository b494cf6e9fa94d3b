"""Multi-task fine-tuning of BERT-style encoders: the pure training library (no cluster code)."""
