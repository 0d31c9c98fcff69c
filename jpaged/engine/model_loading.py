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


FINGERPRINT_WHOLE = 1 << 20     # files up to this size are hashed whole, larger ones in part
FINGERPRINT_MAX_FILES = 10_000


def fingerprint(spec: str) -> str:
    """A SHA-256 naming the model ``spec`` ("tiny" or a checkpoint directory) without
    loading it, for a snapshot to check that a restore loads the weights it was taken
    with. A directory's: every file's relative path and size, the whole content of files
    up to ``FINGERPRINT_WHOLE`` bytes (config, tokenizer) and the first and last
    ``FINGERPRINT_WHOLE`` bytes of larger ones (weights: their headers and ends). A
    ValueError names a spec that is neither, or a directory of more than
    ``FINGERPRINT_MAX_FILES`` files."""
    import hashlib
    import os

    digest = hashlib.sha256()
    if spec == "tiny":
        digest.update(b"tiny")
        return digest.hexdigest()
    if not isinstance(spec, str) or not os.path.isdir(spec):
        raise ValueError(f"model {spec!r} is neither 'tiny' nor a checkpoint directory")
    files = []
    for root, dirs, names in os.walk(spec):
        dirs.sort()
        files += [os.path.join(root, name) for name in sorted(names)]
        if len(files) > FINGERPRINT_MAX_FILES:
            raise ValueError(f"model directory {spec!r} holds more than "
                             f"{FINGERPRINT_MAX_FILES} files: not a checkpoint")
    for file in files:
        size = os.path.getsize(file)
        digest.update(f"{os.path.relpath(file, spec)}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(FINGERPRINT_WHOLE))
            if size > 2 * FINGERPRINT_WHOLE:
                f.seek(size - FINGERPRINT_WHOLE)
            digest.update(f.read())
    return digest.hexdigest()
