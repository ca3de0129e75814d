"""nanotune.model: GPT-2 written out, its weights in the official Hugging Face layout, and what wraps it.

gpt.py           the model: attention -> MLP -> block -> GPT
config.py        its hyperparameters and the four official presets
weights.py       reading and writing the official safetensors (gpt2 ... gpt2-xl), downloads included
loader.py        what a --model names (a preset, a folder, an adapter folder, a file), turned into a model
peft.py          LoRA, bottleneck adapters and prompt tuning: added, saved, loaded and merged
reward_model.py  GPT-2's body with a scalar score head
"""
