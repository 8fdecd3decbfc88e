"""Quantization: weight recipes (torchao, bitsandbytes), precision policy, recurrent-state formats."""
