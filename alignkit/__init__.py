"""alignkit: pretrain -> SFT -> reward model -> PPO from one YAML recipe, on Hugging Face TRL."""

__version__ = "0.1.0"
