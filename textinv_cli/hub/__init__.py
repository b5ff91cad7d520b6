"""The Hugging Face Hub: pull, push, the repo layout and the model card."""
