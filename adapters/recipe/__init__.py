"""The recipe that builds the demo model and its adapters from nothing, deterministically.

`build.py` is the one entry point (`python adapters/recipe/build.py --out DIR`). The pure modules (`schema`,
`prompts`, `phrasing`, `synth`, `params`, `lineage`) need only the standard library, so the gateway's tests can
import them; `tokenizer`, `train` and `evaluate` need torch, transformers, tokenizers and peft (the engine venv).
"""
