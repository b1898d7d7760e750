"""Positive controls: small Llamas trained on data with a known prior, so their Bayesian answer is known.

``llmprobe wind-tunnel CONFIG -o DIR`` (docs/wind-tunnel.md) reads an experiment TOML and a prior
(:mod:`.prior`), renders training sequences with the experiment's own templates and builds a
tokenizer for them (:mod:`.data`), trains a fresh ``LlamaForCausalLM`` sized and run by
:mod:`.settings` (:mod:`.train`), and writes an ordinary Hugging Face checkpoint with a model card
(:mod:`.checkpoint`) that ``llmprobe trace`` and ``transformers`` load like any other Llama.
"""
