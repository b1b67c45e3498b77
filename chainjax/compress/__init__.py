"""Model compression for chains: quantization-aware training (`quant.py`) and magnitude pruning (`prune.py`)."""
