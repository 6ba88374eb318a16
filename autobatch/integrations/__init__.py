"""autobatch inside the training frameworks people use: Hugging Face Accelerate and PyTorch Lightning."""
