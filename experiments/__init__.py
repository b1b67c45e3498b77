"""The sweep runner (`python -m experiments.run`) and one folder per reproduced paper or ablation."""
