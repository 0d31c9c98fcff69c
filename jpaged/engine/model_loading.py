"""Turning ``"tiny"`` or a checkpoint directory into a model: the one place jpaged reaches
the ``models`` package.

jpaged drives any ``jpaged.core.interfaces.Model``; only these functions know that the
built-in ones live in ``models``, and they import it when called, so ``import jpaged``
loads neither ``models`` nor Flax.
"""

from __future__ import annotations

from collections.abc import Mapping

from jpaged.core.interfaces import Model, ModelConfig, check_model


def _models():
    """The ``models`` package, imported on first use (the only import of it in jpaged)."""
    from jpaged import models

    return models


def load_model(model: str | Model, dtype=None, place=None) -> Model:
    """``"tiny"`` (the embedded random model), a HF checkpoint directory (``place``: see
    ``models.load_hf``), or a bundle (a ``jpaged.core.interfaces.Model``), returned as it is."""
    if not isinstance(model, str):
        return check_model(model)
    return _models().load_model(model, dtype=dtype, place=place)


def model_config(model: str | Model) -> ModelConfig:
    """The config of ``model`` ("tiny", a checkpoint directory, or a bundle), read without
    loading any weight."""
    if not isinstance(model, str):
        return check_model(model).config
    models = _models()
    return models.tiny_config() if model == "tiny" else models.load_config(model)


def param_axes(config: ModelConfig) -> Mapping[str, tuple[str | None, ...]]:
    """The declared logical axes of a built-in model's params (before loading any)."""
    return _models().param_axes(config)


def load_tokenizer(directory: str):
    """The ``tokenizers.Tokenizer`` of ``directory`` (its ``tokenizer.json``); a ValueError
    when there is none."""
    tokenizer = _models().load_tokenizer(directory)
    if tokenizer is None:
        raise ValueError(f"tokenizer={directory!r}: no tokenizer.json there")
    return tokenizer
